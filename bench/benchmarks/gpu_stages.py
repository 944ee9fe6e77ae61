"""What `bench gpu-check` runs and how it judges it: each stage's commands and time limit, and each figure
read from their outputs with its target (see `bench.benchmarks.gpu_check`, which runs them)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BENCH = [sys.executable, "-m", "bench", "bench"]
SMOOTH_AP_ROWS = ("smooth_ap_torch", "smooth_ap_triton", "smooth_ap_triton_tf32")
TRAIN = ["--backbone", "resnet50", "--image-size", "224", "--samples-per-class", "4", "--precision", "bf16"]
TRAIN += ["--embedding-dim", "512", "--device", "cuda"]
LARGEST_LOSS_BATCHES = (81920, 98304, 114688, 131072)
LARGEST_PLAIN_BATCHES = (768, 1024, 1536, 2048)
LARGEST_CACHED_BATCHES = (4096, 8192)
GPU_TESTS = ["tests/gpu", "tests/losses/test_smooth_ap_triton.py", "tests/data/test_device_decode.py"]

Reader = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class Figure:
    """One number of the report: read from the stage's outputs (one per command run, None where a command
    wrote nothing), and whether it meets its target (None: recorded only)."""

    name: str
    target: str
    read: Reader
    meets: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class Stage:
    """Commands run one after another under one time limit; `{out}` in a command is its output file.
    `search`: the commands try growing sizes, and the first failure ends the stage without failing it."""

    name: str
    limit_s: float
    commands: list[list[str]]
    figures: list[Figure]
    search: bool = False
    suffix: str = ".json"


def _rows(output: Any) -> list[dict]:
    return output if isinstance(output, list) else []


def _loss_ms(batch: int, loss: str) -> Reader:
    def read(outputs: list[Any]) -> float | None:
        for row in _rows(outputs[0] if outputs else None):
            if row.get("batch_size") == batch and row.get("loss") == loss and row.get("status") == "ok":
                return row["time_ms"]
        return None

    return read


def _largest_ok(key: str = "batch_size", **match: Any) -> Reader:
    """The largest `key` over every row of every output that ran ok (and matches `match`)."""

    def read(outputs: list[Any]) -> int | None:
        sizes = [
            row[key]
            for output in outputs
            for row in _rows(output)
            if row.get("status") == "ok" and all(row.get(k) == v for k, v in match.items())
        ]
        return max(sizes) if sizes else None

    return read


def _train_value(column: str, **match: Any) -> Reader:
    def read(outputs: list[Any]) -> float | None:
        for row in _rows(outputs[0] if outputs else None):
            if row.get("status") == "ok" and all(row.get(k) == v for k, v in match.items()):
                return row[column]
        return None

    return read


def _eval_seconds(implementation: str) -> Reader:
    """Seconds of the eval bench row whose implementation and k-NN placement start with `implementation`."""

    def read(outputs: list[Any]) -> float | None:
        table = outputs[0].get("table", []) if outputs and isinstance(outputs[0], dict) else []
        for row in table:
            if f"{row.get('implementation')} {row.get('knn')}".startswith(implementation):
                return row["seconds"]
        return None

    return read


def _tests(outputs: list[Any]) -> str | None:
    return outputs[0] if outputs else None


def _at_most(limit: float) -> Callable[[Any], bool]:
    return lambda value: value <= limit


def faiss_on_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources")


def stages() -> list[Stage]:
    """Every stage in running order; their limits add up to the default budget, 480 s. A bench command that
    runs cases in their own processes gets a per-case --timeout that fits its cases in the stage's limit."""
    return [_tests_stage(), *_loss_stages(), *_train_stages(), *_eval_stages()]


def _tests_stage() -> Stage:
    """The GPU tests, first: a failure there explains any figure after it."""
    tests = Stage(
        "gpu-tests",
        110,
        [[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS, "--junitxml", "{out}",
          "-k", "not spills"]],  # the sm_90 spill check compiles on any CPU: the CPU suite runs it
        [Figure("GPU tests (decode race, Triton vs torch 1..512 positives, B=65,536, faiss ties, two ranks)",
                "all pass", _tests, lambda summary: summary.endswith(" 0 failed, 0 errors"))],
        suffix=".xml",
    )  # fmt: skip
    return tests


def _loss_stages() -> list[Stage]:
    """Smooth-AP's speed at the issue's two batch sizes, then the largest batch that fits."""
    loss = [*BENCH, "loss", "--device", "cuda", "--dim", "512", "--json", "{out}"]
    loss_stages = []
    for batch, target_ms, limit in ((8192, 5.0, 45), (65536, 100.0, 60)):
        figures = [
            Figure(f"Smooth-AP fwd+bwd B={batch:,} {name} (ms)", f"<= {target_ms:g} ms on an H100",
                   _loss_ms(batch, name), _at_most(target_ms))
            for name in SMOOTH_AP_ROWS
        ]  # fmt: skip
        command = [*loss, "--batch-sizes", str(batch), "--losses", ",".join(SMOOTH_AP_ROWS), "--timeout"]
        per_case = str(limit // len(SMOOTH_AP_ROWS))
        loss_stages.append(Stage(f"loss-{batch}", limit, [[*command, per_case]], figures))
    largest_loss = Stage(
        "loss-largest",
        40,
        [[*loss, "--batch-sizes", ",".join(map(str, LARGEST_LOSS_BATCHES)), "--losses", "smooth_ap_triton",
          "--repeats", "1", "--min-seconds", "0", "--timeout", "10"]],
        [Figure("largest Smooth-AP batch that fits (triton)", f"recorded (tried {LARGEST_LOSS_BATCHES})",
                _largest_ok())],
    )  # fmt: skip
    return [*loss_stages, largest_loss]


def _train_stages() -> list[Stage]:
    """ResNet-50 training steps: plain against gradient-cached, the largest batches, decoding on the GPU."""
    train = [*BENCH, "train", *TRAIN, "--json", "{out}"]
    train_stage = Stage(
        "train-resnet50",
        50,
        [[*train, "--batch-size", "384", "--modes", "plain,chunked", "--steps", "3", "--timeout", "25"]],
        [
            Figure("ResNet-50 224px plain step, B=384 (images/s)", "recorded",
                   _train_value("images_per_s", mode="plain")),
            Figure("ResNet-50 224px gradient-cached step, B=384 (images/s)", "recorded",
                   _train_value("images_per_s", mode="chunked")),
            Figure("peak memory plain, B=384 (MB)", "recorded", _train_value("peak_mb", mode="plain")),
            Figure("peak memory gradient-cached / plain, B=384", "< 1",
                   _train_value("peak_x_plain", mode="chunked"), lambda ratio: ratio < 1),
        ],
    )  # fmt: skip
    largest_train = [
        Stage(
            f"train-largest-{mode}",
            30,
            [[*train, "--batch-size", str(b), "--modes", mode, "--steps", "1", "--timeout", "30"]
             for b in sizes],
            [Figure(f"largest {name} batch (tried {', '.join(map(str, sizes))})", "recorded",
                    _largest_ok(mode=mode))],
            search=True,
        )
        for mode, name, sizes in (("plain", "plain", LARGEST_PLAIN_BATCHES),
                                  ("chunked", "gradient-cached", LARGEST_CACHED_BATCHES))
    ]  # fmt: skip
    decode = Stage(
        "decode",
        35,
        [[*train, "--batch-size", "256", "--modes", "plain", "--decode", "cpu,gpu", "--steps", "3",
          "--timeout", "17"]],
        [Figure("training on JPEGs decoded on the CPU (images/s)", "recorded",
                _train_value("images_per_s", decode="cpu")),
         Figure("training on JPEGs decoded on the GPU (images/s)", "> the CPU's",
                _train_value("images_per_s", decode="gpu"))],
    )  # fmt: skip
    return [train_stage, *largest_train, decode]


def _eval_stages() -> list[Stage]:
    """Evaluation at SOP's and iNaturalist's test sizes, ours at each placement against PML."""
    placements = "faiss@cpu,torch@cuda" + (",faiss@cuda" if faiss_on_gpu() else "")
    eval_stages = [
        Stage(
            f"eval-{n}",
            limit,
            [
                [
                    *BENCH,
                    "eval",
                    "--n",
                    str(n),
                    "--classes",
                    str(classes),
                    "--backend",
                    placements,
                    "--json",
                    "{out}",
                    "--timeout",
                    str(limit),
                ]
            ],
            [
                Figure(f"evaluation of {n:,} x 512 ({place}, s)", target, _eval_seconds(prefix))
                for place, prefix, target in (
                    ("ours, faiss-cpu", "smoothap-bench faiss@cpu", "recorded"),
                    ("ours, torch on the GPU", "smoothap-bench torch@cuda", "< faiss-cpu's and PML's"),
                    ("ours, faiss-gpu", "smoothap-bench faiss@cuda", "< faiss-cpu's and PML's"),
                    ("PML, faiss-cpu", "pytorch-metric-learning", "recorded"),
                )
            ],
        )  # fmt: skip
        for n, classes, limit in ((60502, 11316, 40), (136093, 2452, 40))
    ]
    return eval_stages
