"""`smoothap-bench bench train`: images/s and peak memory of training steps, the plain step and the
gradient-cached one (`train.chunk_size`) side by side, on one process or several.

Each case (processes, step) is a fresh launch, `torchrun --standalone --nproc_per_node=N -m
bench.benchmarks.train_bench CASE` (N = 1 too), so its peak memory is its own and N processes train as
`torchrun -m bench train` does (`bench.train.distributed`). Every rank builds the run's trainer through
`build_trainer` (the backbone, frozen BatchNorm unless asked otherwise, the loss, Adam) for one synthetic
global P x K batch of random images, takes its share of it and times `steps` optimisation steps after
`warmup` ones; rank 0 reports:
- images/s: the global batch over the median step time (forward, loss, backward, update; the data are
  already in memory, so the loading pipeline is not measured: `bench data` does that).
- peak memory, rank 0's process: on the CPU the growth of the resident-set high-water mark (getrusage) over
  the steps, from after the trainer and the batch exist (an upper bound: it includes allocator slack); on
  CUDA torch.cuda.max_memory_allocated over the steps, less what was held before.
`threads` (default: every core) are shared out among a case's processes, so 1 and N processes use the same
cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAIN, CHUNKED = "plain", "chunked"


def _measure_case(
    backbone: str,
    image_size: int,
    batch_size: int,
    samples_per_class: int,
    chunk_size: int | None,
    loss: str,
    embedding_dim: int,
    freeze_bn: bool,
    steps: int,
    warmup: int,
    device: str,
    threads: int,
) -> dict | None:
    """Run on every rank of one launch: the timed steps; rank 0's result (None on the other ranks)."""
    import resource

    import torch

    import losses
    from bench.config import experiment_from_dict
    from bench.data import DatasetBundle
    from bench.data.omniglot import TensorImages
    from bench.device import resolve_device
    from bench.train import build_trainer
    from bench.train.distributed import process_group

    torch.set_num_threads(threads)
    with process_group(resolve_device(device).type) as dist:
        dev = dist.device if dist is not None else resolve_device(device)
        exp = experiment_from_dict(
            {
                "data": {"batch_size": batch_size, "samples_per_class": samples_per_class, "augment": False},
                "model": {"backbone": backbone, "embedding_dim": embedding_dim, "freeze_bn": freeze_bn},
                "loss": {"name": loss},
                "train": {"chunk_size": chunk_size},
            }
        )
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(batch_size, 3, image_size, image_size, generator=gen)
        labels = torch.arange(batch_size // samples_per_class).repeat_interleave(samples_per_class)
        bundle = DatasetBundle("synthetic", TensorImages(images, labels.numpy()), None, [])
        trainer, _ = build_trainer(exp, losses.get_loss(loss), bundle, dev, dist)
        trainer.model.train()
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        images, labels = images[share], labels[share]
        cuda = dev.type == "cuda"

        def step() -> float:
            if cuda:
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            trainer.step(trainer, images, labels)
            if cuda:
                torch.cuda.synchronize(dev)
            return time.perf_counter() - start

        if cuda:
            held = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        times = [step() for _ in range(warmup + steps)][warmup:]
        if cuda:
            peak = torch.cuda.max_memory_allocated(dev) - held
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
        if rank != 0:
            return None
        median = statistics.median(times)
        return {
            "step": type(trainer.step).__name__,
            "step_s": median,
            "fastest_s": min(times),
            "images_per_s": batch_size / median,
            "peak_mb": peak / 2**20,
        }


def _launch_case(args: dict, processes: int, timeout_s: float) -> dict:
    """One case in a fresh torchrun launch; its result, or a status saying why there is none."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "bench.benchmarks.train_bench",
        json.dumps(args),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(args["threads"]),
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
    backbone: str = "resnet18",
    image_size: int = 64,
    batch_size: int = 1024,
    samples_per_class: int = 4,
    chunk_size: int = 64,
    loss: str = "smooth_ap",
    embedding_dim: int = 128,
    freeze_bn: bool = True,
    processes: tuple[int, ...] = (1,),
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    timeout_s: float = 1800.0,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (processes, plain or chunked step): step time, images/s, peak memory, and the ratios
    chunked / plain (peak memory) and N processes / 1 (images/s)."""
    total_threads = threads or os.cpu_count() or 1
    rows = []
    for count in processes:
        if batch_size // samples_per_class % count:
            raise ValueError(
                f"--nproc {count}: {batch_size // samples_per_class} classes per batch do not split by whole "
                "classes over that many processes"
            )
        for mode, chunk in ((PLAIN, None), (CHUNKED, chunk_size)):
            args = {
                "backbone": backbone,
                "image_size": image_size,
                "batch_size": batch_size,
                "samples_per_class": samples_per_class,
                "chunk_size": chunk,
                "loss": loss,
                "embedding_dim": embedding_dim,
                "freeze_bn": freeze_bn,
                "steps": steps,
                "warmup": warmup,
                "device": device,
                "threads": max(1, total_threads // count),
            }
            row = {"processes": count, "mode": mode, "chunk_size": chunk, "batch_size": batch_size}
            row.update(_launch_case(args, count, timeout_s))
            if progress:
                print(_format_row(row), file=sys.stderr, flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("step", "step_s", "fastest_s", "images_per_s", "peak_mb"):
        if column not in table:
            table[column] = float("nan")
    plain = table[table["mode"] == PLAIN].set_index("processes")["peak_mb"]
    table["peak_x_plain"] = table["peak_mb"] / table["processes"].map(plain)
    one = table[table["processes"] == 1].set_index("mode")["images_per_s"]
    table["speed_x_1proc"] = table["images_per_s"] / table["mode"].map(one)
    columns = ["processes", "mode", "chunk_size", "batch_size", "step", "step_s", "fastest_s"]
    return table[columns + ["images_per_s", "peak_mb", "peak_x_plain", "speed_x_1proc", "status"]]


def _format_row(row: dict) -> str:
    what = f"{row['processes']} proc {row['mode']:<7} B={row['batch_size']}"
    if row.get("status") != "ok":
        return f"{what} {row.get('status')}"
    return f"{what} {row['step_s']:.2f} s/step {row['images_per_s']:.1f} img/s {row['peak_mb']:.0f} MB"


def format_table(table: pd.DataFrame) -> str:
    """Markdown; peak / plain compares the steps at the same process count, speed / 1 proc the same step."""
    lines = [
        "| processes | step | chunk | B | s/step (median) | fastest s | images/s | peak MB (rank 0) "
        "| peak / plain | images/s / 1 proc | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def num(value, digits: int) -> str:
        return "" if pd.isna(value) else f"{value:.{digits}f}"

    for row in table.itertuples():
        chunk = "" if pd.isna(row.chunk_size) else str(int(row.chunk_size))
        lines.append(
            f"| {row.processes} | {row.mode} | {chunk} | {row.batch_size} | {num(row.step_s, 2)} | "
            f"{num(row.fastest_s, 2)} | {num(row.images_per_s, 1)} | {num(row.peak_mb, 0)} | "
            f"{num(row.peak_x_plain, 2)} | {num(row.speed_x_1proc, 2)} | {row.status} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # one case, on each rank torchrun starts
    result = _measure_case(**json.loads(sys.argv[1]))
    if result is not None:
        print(json.dumps(result), flush=True)
