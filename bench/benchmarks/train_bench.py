"""`smoothap-bench bench train`: images/s and peak memory of training steps, the plain step and the
gradient-cached one (`train.chunk_size`) side by side, on one process or several, fed from memory or from
JPEG files through the training DataLoader, with each step's time split into its parts.

Each case (processes, input, step) is a fresh launch, `torchrun --standalone --nproc_per_node=N -m
bench.benchmarks.train_bench CASE` (N = 1 too), so its peak memory is its own and N processes train as
`torchrun -m bench train` does (`bench.train.distributed`). Every rank builds the run's trainer through
`build_trainer` (the backbone, frozen BatchNorm unless asked otherwise, the loss, Adam) and times `steps`
optimisation steps after `warmup` ones. The input (`decode`) is one of:
- memory: one synthetic global P x K batch of random images, already in memory (each rank takes its share):
  the ceiling, with no loading at all.
- cpu / gpu: `jpeg_images` synthetic photo-like JPEGs (written once to a temporary folder, listed over and
  over to fill the steps' batches) through the run's own P x K DataLoader with `workers` workers and the
  training augmentation, `data.decode` cpu (PIL in the workers) or gpu (the workers read bytes; the batch is
  decoded and augmented on the device, `bench.data.device_decode`).
Rank 0 reports:
- images/s: the global batch over the mean step time, data wait included (so images over the time of the
  timed steps).
- the mean step split into data (waiting for the loader's next batch), to device (the host-to-device copy;
  with decode gpu also decoding and augmenting there), forward (the model's forward calls), loss,
  optimizer (its step) and backward (the rest: the backward pass, zero_grad, gradient clipping, gathers under
  DDP; the chunked step's replayed forwards count as forward). On CUDA every boundary synchronises the device,
  so each part holds its own kernels.
- peak memory, rank 0's process: on the CPU the growth of the resident-set high-water mark (getrusage) over
  the steps, from after the trainer and the batch exist (an upper bound: it includes allocator slack); on
  CUDA torch.cuda.max_memory_allocated over the steps, less what was held before.
`threads` (default: every core) are shared out among a case's processes, so 1 and N processes use the same
cores; so are the loader `workers` (default: every core).

Warm-up steps take the batches of one epoch, timed steps those of a fresh one, whose loader workers start
cold and then run up to 2 batches each ahead, as at the start of every epoch of a run (the workers are not
persistent): time about as many steps as an epoch has (SOP at B = 384: 155) for a run's mix of the two.

The paper's recipe (ResNet-50, 224 px, bf16 autocast, B = 384 as P x K with K = 4), decoding on the CPU and on
the GPU against the in-memory ceiling, plain step only, on one GPU with every core loading (500 x 375 JPEGs,
about a photo of SOP or CUB; 100 timed steps are 38,400 images, two thirds of an SOP epoch):

    smoothap-bench bench train --device cuda --backbone resnet50 --image-size 224 --batch-size 384 \\
        --samples-per-class 4 --precision bf16 --modes plain --decode memory,cpu,gpu --jpeg-images 1024 \\
        --warmup 5 --steps 100
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from itertools import product, repeat
from pathlib import Path

import numpy as np
import pandas as pd

from bench.benchmarks.step_clock import PARTS, time_steps
from bench.benchmarks.train_inputs import jpeg_bundle, loader_epoch, memory_case, write_jpegs

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAIN, CHUNKED = "plain", "chunked"
MEMORY = "memory"  # the input of a case fed from an in-memory batch, beside data.decode's cpu and gpu


@dataclass(frozen=True)
class TrainSetup:
    """What every case trains, and how many steps it warms up and times."""

    backbone: str = "resnet18"
    image_size: int = 64
    batch_size: int = 1024  # global, P x K
    samples_per_class: int = 4
    loss: str = "smooth_ap"
    embedding_dim: int = 128
    freeze_bn: bool = True
    amp: bool = True
    device: str = "cpu"
    steps: int = 3
    warmup: int = 1


@dataclass(frozen=True)
class TrainSweep:
    """The cases of one command: every process count x input x step, and what they share out."""

    processes: tuple[int, ...] = (1,)
    decodes: tuple[str, ...] = (MEMORY,)
    modes: tuple[str, ...] = (PLAIN, CHUNKED)
    chunk_size: int = 64  # the chunked step's
    jpeg_images: int = 512
    jpeg_side: int = 500
    threads: int | None = None  # torch threads shared out among a case's processes (None: every core)
    workers: int | None = None  # loader workers shared out likewise
    timeout_s: float = 1800.0

    def case(self, setup: TrainSetup, processes: int, decode: str, mode: str, jpeg_dir: str) -> TrainCase:
        cores = os.cpu_count() or 1
        return TrainCase(
            setup,
            self.chunk_size if mode == CHUNKED else None,
            decode,
            jpeg_dir,
            threads=max(1, (self.threads or cores) // processes),
            workers=max(1, (self.workers or cores) // processes),
        )


@dataclass(frozen=True)
class TrainCase:
    """One launch: the setup with its step (`chunk_size` None: plain), input and share of the cores. It
    reaches the launched processes as JSON on their command line."""

    setup: TrainSetup
    chunk_size: int | None = None
    decode: str = MEMORY
    jpeg_dir: str | None = None
    threads: int = 1
    workers: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainCase:
        fields = json.loads(text)
        return cls(TrainSetup(**fields.pop("setup")), **fields)

    def experiment(self):
        """The run's config of this case: its data, model, loss and step."""
        from bench.config import experiment_from_dict

        setup = self.setup
        data = {
            "batch_size": setup.batch_size,
            "samples_per_class": setup.samples_per_class,
            "augment": self.decode != MEMORY,
        }
        if self.decode != MEMORY:
            data.update(image_size=setup.image_size, decode=self.decode, num_workers=self.workers)
        model = {
            "backbone": setup.backbone,
            "embedding_dim": setup.embedding_dim,
            "freeze_bn": setup.freeze_bn,
        }
        train = {"chunk_size": self.chunk_size, "amp": setup.amp}
        return experiment_from_dict(
            {"data": data, "model": model, "loss": {"name": setup.loss}, "train": train}
        )


def measure_case(case: TrainCase) -> dict | None:
    """Run on every rank of one launch: the timed steps; rank 0's result (None on the other ranks)."""
    import torch

    import losses
    from bench.device import resolve_device
    from bench.train import build_trainer
    from bench.train.distributed import process_group

    setup = case.setup
    torch.set_num_threads(case.threads)
    with process_group(resolve_device(setup.device).type) as dist:
        dev = dist.device if dist is not None else resolve_device(setup.device)
        exp = case.experiment()
        torch.backends.cudnn.benchmark = dev.type == "cuda"  # as a run sets it
        if case.decode == MEMORY:
            bundle, batch = memory_case(setup.batch_size, setup.samples_per_class, setup.image_size)
        else:  # each of the two epochs (warm-up, timed) long enough for its steps
            bundle = jpeg_bundle(
                case.jpeg_dir, exp.data, setup.batch_size * max(setup.warmup, setup.steps, 1)
            )
        trainer, _ = build_trainer(exp, losses.get_loss(setup.loss), bundle, dev, dist)
        trainer.model.train()
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        if case.decode == MEMORY:
            share = slice(rank * setup.batch_size // world, (rank + 1) * setup.batch_size // world)
            rank_batch = (batch[0][share], batch[1][share])

            def epoch_batches(_epoch: int) -> Iterator:
                return repeat(rank_batch)
        else:
            epoch_batches = partial(loader_epoch, trainer)
        timed, peak = time_steps(trainer, epoch_batches, setup.warmup, setup.steps)
        return _result(type(trainer.step).__name__, timed, peak, setup.batch_size) if rank == 0 else None


def _result(step: str, timed: pd.DataFrame, peak: int, batch_size: int) -> dict:
    totals = timed.sum(axis=1)
    return {
        "step": step,
        "step_s": totals.mean(),
        "fastest_s": totals.min(),
        "images_per_s": batch_size / totals.mean(),
        **timed.mean().to_dict(),
        "peak_mb": peak / 2**20,
    }


def _launch_case(case: TrainCase, processes: int, timeout_s: float) -> dict:
    """One case in a fresh torchrun launch; its result, or a status saying why there is none."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "bench.benchmarks.train_bench",
        case.to_json(),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(case.threads),
    }
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout_s:.0f}s"}
    results = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not results:
        errors = [line for line in done.stderr.splitlines() if "Error" in line] or done.stderr.splitlines()
        return {"status": f"error: {(errors or [f'exit {done.returncode}'])[-1].strip()[:160]}"}
    return {"status": "ok", **json.loads(results[-1])}


def run_train_bench(
    setup: TrainSetup = TrainSetup(),
    sweep: TrainSweep = TrainSweep(),
    progress: bool = True,
    any_device: bool = False,
) -> pd.DataFrame:
    """One row per (processes, input, plain or chunked step): step time and its split, images/s, peak memory,
    and the ratios chunked / plain (peak memory) and N processes / 1 (images/s) between rows of one input.
    `any_device` lets tests time decode gpu on the CPU; no command exposes it."""
    import torch

    from bench.data.device_decode import check_decode_device

    if "gpu" in sweep.decodes:
        check_decode_device("gpu", torch.device(setup.device), any_device=any_device)
    classes = setup.batch_size // setup.samples_per_class
    for count in sweep.processes:
        if classes % count:
            raise ValueError(
                f"--nproc {count}: {classes} classes per batch do not split by whole classes over that many "
                "processes"
            )
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-bench-jpegs-") as folder:
        if set(sweep.decodes) - {MEMORY}:
            write_jpegs(Path(folder), sweep.jpeg_images, sweep.jpeg_side)
        for count, decode, mode in product(sweep.processes, sweep.decodes, sweep.modes):
            case = sweep.case(setup, count, decode, mode, folder)
            row = {"processes": count, "decode": decode, "mode": mode, "chunk_size": case.chunk_size}
            row.update(batch_size=setup.batch_size, **_launch_case(case, count, sweep.timeout_s))
            if progress:
                print(_format_row(row), file=sys.stderr, flush=True)
            rows.append(row)
    return _with_ratios(pd.DataFrame(rows))


def _with_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """The table's columns in order, with peak memory against the plain step at the same process count and
    input, and images/s against one process with the same step and input."""
    for column in ("step", "step_s", "fastest_s", "images_per_s", *PARTS, "peak_mb"):
        if column not in table:
            table[column] = float("nan")
    plain = table["mode"] == PLAIN
    table["peak_x_plain"] = table["peak_mb"] / _reference(table, "peak_mb", ["processes", "decode"], plain)
    one = table["processes"] == 1
    table["speed_x_1proc"] = table["images_per_s"] / _reference(
        table, "images_per_s", ["mode", "decode"], one
    )
    columns = ["processes", "decode", "mode", "chunk_size", "batch_size", "step", "step_s", "fastest_s"]
    return table[columns + ["images_per_s", *PARTS, "peak_mb", "peak_x_plain", "speed_x_1proc", "status"]]


def _reference(table: pd.DataFrame, column: str, keys: list[str], rows: pd.Series) -> np.ndarray:
    """For each row, `column` of the row among `rows` that shares its `keys` (NaN where there is none)."""
    values = table[rows].set_index(keys)[column].to_dict()
    return np.array([values.get(key, np.nan) for key in table[keys].itertuples(index=False, name=None)])


def _format_row(row: dict) -> str:
    what = f"{row['processes']} proc {row['decode']:<6} {row['mode']:<7} B={row['batch_size']}"
    if row.get("status") != "ok":
        return f"{what} {row.get('status')}"
    split = " ".join(f"{part.removesuffix('_s')} {row[part]:.3f}" for part in PARTS)
    return (
        f"{what} {row['step_s']:.2f} s/step ({split}) {row['images_per_s']:.1f} img/s {row['peak_mb']:.0f} MB"
    )


def format_table(table: pd.DataFrame) -> str:
    """Markdown; peak / plain compares the steps at the same process count and input, speed / 1 proc the same
    step and input. The split columns are mean seconds per step and sum to s/step."""
    header = ["processes", "input", "step", "chunk", "B", "s/step (mean)", "fastest s", "images/s"]
    header += [f"{part.removesuffix('_s').replace('_', ' ')} s" for part in PARTS]
    header += ["peak MB (rank 0)", "peak / plain", "images/s / 1 proc", "status"]
    align = ["---" if name in ("input", "step", "status") else "---:" for name in header]
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|"]

    def num(value, digits: int) -> str:
        return "" if pd.isna(value) else f"{value:.{digits}f}"

    for row in table.itertuples():
        chunk = "" if pd.isna(row.chunk_size) else str(int(row.chunk_size))
        cells = [row.processes, row.decode, row.mode, chunk, row.batch_size, num(row.step_s, 2)]
        cells += [num(row.fastest_s, 2), num(row.images_per_s, 1)]
        cells += [num(getattr(row, part), 3) for part in PARTS]
        cells += [num(row.peak_mb, 0), num(row.peak_x_plain, 2), num(row.speed_x_1proc, 2), row.status]
        lines.append(f"| {' | '.join(map(str, cells))} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one case, on each rank torchrun starts
    result = measure_case(TrainCase.from_json(sys.argv[1]))
    if result is not None:
        print(json.dumps(result), flush=True)
