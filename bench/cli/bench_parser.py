"""The `bench` subcommands' parsers: speed and memory measured side by side in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli import commands as handlers
from bench.device import DEVICE_CHOICES


def int_list(text: str) -> tuple[int, ...]:
    """`224,384` -> (224, 384), or an argparse error naming the text."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def name_list(*choices: str):
    """An argparse type: `a,b` -> ("a", "b"), each one of `choices`, or an error listing them."""

    def parse(text: str) -> tuple[str, ...]:
        picked = tuple(text.split(","))
        if not set(picked) <= set(choices):
            raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}, got {text!r}")
        return picked

    return parse


def add_output(command, timeout_help: str) -> None:
    """`--json PATH` and `--timeout SECONDS`, which every bench command takes (for `bench gpu-check`)."""
    command.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    command.add_argument("--timeout", type=float, metavar="SECONDS", help=timeout_help)


def add_loss_bench(bench_commands) -> None:
    """`bench loss`: forward+backward time and peak memory of every loss."""
    loss = bench_commands.add_parser(
        "loss",
        help="forward+backward time and peak memory of every loss, ratios to our Smooth-AP",
        description="For each batch size (4 samples per class, D=512): our Smooth-AP (on CUDA also its "
        "torch and Triton backends side by side), the released code's B x B x B algorithm (where it fits), "
        "pytorch-metric-learning's SmoothAPLoss and the other losses, each case in its own process.",
    )
    loss.add_argument(
        "--batch-sizes",
        type=int_list,
        default=(224, 384, 1024, 4096, 8192),
        help="comma-separated batch sizes (default: 224,384,1024,4096,8192)",
    )
    loss.add_argument("--samples-per-class", type=int, default=4)
    loss.add_argument("--dim", type=int, default=512, help="embedding size (default: 512)")
    loss.add_argument(
        "--losses",
        help="comma-separated subset: registry names, smooth_ap_bbb (released B x B x B algorithm), "
        "smooth_ap_pml, smooth_ap_torch and smooth_ap_triton (ours with that backend), "
        "smooth_ap_triton_tf32 (TF32 products, with their error against fp32); the last three are in the "
        "default on CUDA (default: all)",
    )
    loss.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="at least this many timed passes per case; the fastest counts (default: 3)",
    )
    loss.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="keep timing a case until its passes add up to this many seconds, as timeit does, "
        "so fast cases get enough passes to find an undisturbed one (default: 1)",
    )
    loss.add_argument("--threads", type=int, help="torch threads per case (default: torch's own)")
    loss.add_argument(
        "--max-bbb-gb",
        type=float,
        default=4.0,
        help="skip the B x B x B algorithm where it would need more memory (default: 4)",
    )
    loss.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    add_output(loss, "seconds per case, each in its own process (default: 600)")
    loss.set_defaults(handler=handlers.cmd_bench_loss)


def add_eval_bench(bench_commands) -> None:
    """`bench eval`: our retrieval metrics against pytorch-metric-learning's, per placement."""
    evaluation = bench_commands.add_parser(
        "eval",
        help="our retrieval metrics against pytorch-metric-learning's AccuracyCalculator",
        description="Random normalised embeddings of the SOP test size, evaluated by both in one run: "
        "time, speed ratio and agreement of precision@1, MAP@R and R-precision.",
    )
    evaluation.add_argument(
        "--n", type=int, default=60502, help="embeddings (default: 60,502, SOP's test set)"
    )
    evaluation.add_argument("--classes", type=int, default=11316, help="classes (default: 11,316)")
    evaluation.add_argument("--dim", type=int, default=512)
    evaluation.add_argument(
        "--backend",
        default="auto",
        metavar="BACKEND[@DEVICE],...",
        help="where ours runs, one row each: BACKEND auto, faiss or torch; DEVICE cpu (default) or cuda, "
        "where the embeddings live and the search runs (faiss on cuda needs the gpu extra); the first is the "
        "reference for speed-ups, e.g. faiss@cpu,torch@cuda,faiss@cuda (default: auto)",
    )
    evaluation.add_argument(
        "--memory-check",
        action="store_true",
        help="also evaluate 136,093 x 512 (iNaturalist's test size) at each placement and report peak memory",
    )
    add_output(evaluation, "stop the whole command after this many seconds (default: no limit)")
    evaluation.set_defaults(handler=handlers.cmd_bench_eval)


def add_data_bench(bench_commands) -> None:
    """`bench data`: images/s of a dataset's loading pipeline."""
    data_bench = bench_commands.add_parser(
        "data",
        help="images/s of a dataset's loading pipeline",
        description="Decode, transform and batch images as training does.",
    )
    source = data_bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="bundled config name whose data section to use (e.g. sop)")
    source.add_argument(
        "--synthetic", action="store_true", help="a generated folder of JPEGs, no download needed"
    )
    data_bench.add_argument("--root", help="dataset folder (default: the config's data.root)")
    data_bench.add_argument("--workers", type=int, help="DataLoader workers (default: the config's)")
    data_bench.add_argument("--batch-size", type=int, help="images per batch (default: the config's)")
    data_bench.add_argument("--batches", type=int, default=20, help="batches to time (default: 20)")
    add_output(data_bench, "stop the whole command after this many seconds (default: no limit)")
    data_bench.set_defaults(handler=handlers.cmd_bench_data)


def add_epoch_bench(bench_commands) -> None:
    """`bench epochs`: a real run's training images/s, for checkouts side by side."""
    epochs = bench_commands.add_parser(
        "epochs",
        help="training images/s of the real `bench train`, for several checkouts side by side",
        description="Runs `python -m bench train` in each --tree (e.g. an older commit checked out with "
        "`git worktree add /tmp/old df6fcb6`), alternating trees, and reads the images/s each epoch logged "
        "and the test metrics back from the runs: the speed-up, whether the numbers held, and the limit set "
        "by the model's FLOPs and this CPU's matmul rate.",
    )
    epochs.add_argument(
        "--tree",
        action="append",
        type=Path,
        help="a checkout to run (repeatable; the first is the reference of the ratios; default: this one)",
    )
    epochs.add_argument("--config", default="omniglot", help="bundled config name or YAML path")
    epochs.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    epochs.add_argument(
        "--repeats", type=int, default=2, help="runs per tree, run r with seed r (default: 2)"
    )
    epochs.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    epochs.add_argument("--out", type=Path, metavar="FILE", help="also write the report as markdown to FILE")
    add_output(epochs, "stop the whole command after this many seconds (default: no limit)")
    epochs.set_defaults(handler=handlers.cmd_bench_epochs)


def add_train_bench(bench_commands) -> None:
    """`bench train`: the plain and the gradient-cached training step side by side, over process counts and
    inputs (in memory, JPEGs decoded on the CPU or on the GPU)."""

    train = bench_commands.add_parser(
        "train",
        help="images/s, its split and peak memory of training steps, plain and chunked, on 1..N processes",
        description="Time training steps of a backbone on a synthetic P x K batch in memory or on JPEG files "
        "through the training DataLoader, the plain step and the gradient-cached one side by side, each case "
        "in a fresh torchrun launch (one process, or N with --nproc, training as `torchrun -m bench train` "
        "does). Reports images/s, the step split into data wait, to device, forward, loss, backward and "
        "optimizer, rank 0's peak memory, chunked / plain peak memory and N / 1 process images/s. The "
        "paper's recipe: --backbone resnet50 --image-size 224 --batch-size 384 --samples-per-class 4 "
        "--precision bf16 (see bench/benchmarks/train_bench.py for the full command).",
    )
    _add_train_model_flags(train)
    _add_train_case_flags(train)
    add_output(train, "seconds per case, each in a fresh torchrun launch (default: 1800)")
    train.set_defaults(handler=handlers.cmd_bench_train)


def _add_train_model_flags(train) -> None:
    """What `bench train` trains: the model, the batch, the chunked step's chunks, the loss."""
    train.add_argument("--backbone", default="resnet18", help="model.backbone (default: resnet18)")
    train.add_argument("--image-size", type=int, default=64, help="side of the images (default: 64)")
    train.add_argument("--batch-size", type=int, default=1024, help="global batch P x K (default: 1024)")
    train.add_argument("--samples-per-class", type=int, default=4, help="K (default: 4)")
    train.add_argument(
        "--chunk-size", type=int, default=64, help="train.chunk_size of the chunked step (default: 64)"
    )
    train.add_argument("--loss", default="smooth_ap", help="registry name of the loss (default: smooth_ap)")
    train.add_argument("--embedding-dim", type=int, default=128, help="model.embedding_dim (default: 128)")
    train.add_argument(
        "--train-bn",
        action="store_true",
        help="BatchNorm in training mode (default: frozen, the paper's recipe)",
    )


def _add_train_case_flags(train) -> None:
    """Which cases `bench train` runs (processes, inputs, steps) and how long each one times."""
    train.add_argument(
        "--nproc",
        type=int_list,
        default=(1,),
        help="comma-separated process counts, e.g. 1,2 for the scaling from one process to two (default: 1)",
    )
    train.add_argument("--steps", type=int, default=3, help="timed steps per case (default: 3)")
    train.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default: 1)")
    train.add_argument(
        "--threads", type=int, help="torch threads shared out among a case's processes (default: all cores)"
    )
    train.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    train.add_argument(
        "--decode",
        type=name_list("memory", "cpu", "gpu"),
        default=("memory",),
        help="comma-separated inputs, one row each: memory (a random batch already in memory), cpu or gpu "
        "(synthetic JPEGs through the DataLoader, data.decode cpu or gpu) (default: memory)",
    )
    train.add_argument(
        "--jpeg-images", type=int, default=512, help="distinct JPEG files for cpu and gpu (default: 512)"
    )
    train.add_argument(
        "--jpeg-side", type=int, default=500, help="JPEG width; height is 3/4 of it (default: 500)"
    )
    train.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers shared out among a case's processes (default: all cores)",
    )
    train.add_argument(
        "--modes",
        type=name_list("plain", "chunked"),
        default=("plain", "chunked"),
        help="comma-separated steps to time: plain, chunked (default: both)",
    )
    train.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16 autocast (train.amp, CUDA only) or fp32 (default: bf16)",
    )


def add_gpu_check(bench_commands) -> None:
    """`bench gpu-check`: the GPU tests and every GPU benchmark in one budget, figures against targets."""
    check = bench_commands.add_parser(
        "gpu-check",
        help="the GPU tests and every GPU benchmark under one time budget: report.json and report.md",
        description="Records the environment, runs the `gpu` tests and each benchmark (Smooth-AP "
        "fwd+bwd, the largest loss batch, ResNet-50 training plain vs gradient-cached and its largest batch, "
        "GPU vs CPU decoding, GPU evaluation vs faiss-cpu and PML) as its own process under its own time "
        "limit, within the total budget, and writes each figure against its target "
        "(bench/benchmarks/gpu_check.py).",
    )
    check.add_argument(
        "--out", default="results/gpu", help="folder for report.json, report.md and each stage's output"
    )
    check.add_argument(
        "--budget", type=float, default=480.0, help="seconds for all stages together (default: 480)"
    )
    check.add_argument("--machine", help="the machine's name for the report (default: the GPU's name)")
    check.add_argument(
        "--only",
        type=lambda text: text.split(","),
        help="comma-separated stage names to run, e.g. to rerun what timed out (default: all; see --dry-run)",
    )
    check.add_argument(
        "--dry-run", action="store_true", help="list each stage, its time limit and its figures; run nothing"
    )
    add_output(check, "the same as --budget (every bench command takes --timeout)")
    check.set_defaults(handler=handlers.cmd_bench_gpu_check)
