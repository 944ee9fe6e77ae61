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
import time
from collections.abc import Callable, Iterator
from functools import partial
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAIN, CHUNKED = "plain", "chunked"
MEMORY = "memory"  # the input of a case fed from an in-memory batch, beside data.decode's cpu and gpu
PARTS = ("data_s", "to_device_s", "forward_s", "loss_s", "backward_s", "optimizer_s")


class StepClock:
    """Splits a training step's time by hooks on the model, the loss and the optimizer, so the step strategy
    itself is timed unchanged; on CUDA each boundary synchronises the device."""

    def __init__(self, trainer, device) -> None:
        import torch

        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.totals: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.first_forward: float | None = None
        model, loss_fn, optimizer = trainer.forward_model, trainer.loss_fn, trainer.optimizer
        self.handles = [
            model.register_forward_pre_hook(lambda *_: self._start("forward_s")),
            model.register_forward_hook(lambda *_: self._stop("forward_s")),
            loss_fn.register_forward_pre_hook(lambda *_: self._start("loss_s")),
            loss_fn.register_forward_hook(lambda *_: self._stop("loss_s")),
            optimizer.register_step_pre_hook(lambda *_: self._start("optimizer_s")),
            optimizer.register_step_post_hook(lambda *_: self._stop("optimizer_s")),
        ]

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _start(self, part: str) -> None:
        self.started[part] = self.now()
        if part == "forward_s" and self.first_forward is None:
            self.first_forward = self.started[part]

    def _stop(self, part: str) -> None:
        self.totals[part] = self.totals.get(part, 0.0) + self.now() - self.started.pop(part)

    def step(self, trainer, batches: Iterator) -> dict[str, float]:
        """One step on the next batch: seconds per part, summing to the step's time."""
        self.totals, self.first_forward = {}, None
        start = self.now()
        images, labels = next(batches)
        loaded = self.now()
        trainer.step(trainer, images, labels)
        end = self.now()
        parts = {"data_s": loaded - start, "to_device_s": (self.first_forward or end) - loaded, **self.totals}
        parts["backward_s"] = end - start - sum(parts.values())
        return {part: parts.get(part, 0.0) for part in PARTS}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def write_jpegs(folder: Path, count: int, side: int, seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs of side x 3/4 side at quality 90 (smooth colour fields with mild noise, about
    the file size of a photo of that size, so decoding costs about what a photo's does)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = side, max(1, side * 3 // 4)
    paths = []
    for n in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = (field + rng.integers(-8, 9, field.shape)).clip(0, 255).astype(np.uint8)
        paths.append(folder / f"{n:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def _jpeg_bundle(folder: str, config, items: int):
    """A training set of `items` entries cycling over the folder's JPEGs, 2K entries per class, with the
    run's training transform."""
    from bench.data import DatasetBundle
    from bench.data.images import ImageList
    from bench.data.transforms import make_transforms

    files = sorted(Path(folder).glob("*.jpg"))
    per_class = 2 * config.samples_per_class
    paths = [files[i % len(files)] for i in range(items)]
    train = ImageList(paths, [i // per_class for i in range(items)], make_transforms(config)[0])
    return DatasetBundle("jpegs", train, None, [])


def _memory_case(batch_size: int, samples_per_class: int, image_size: int):
    """The in-memory input: a bundle holding one random global batch, and that batch."""
    import torch

    from bench.data import DatasetBundle
    from bench.data.omniglot import TensorImages

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.arange(batch_size // samples_per_class).repeat_interleave(samples_per_class)
    return DatasetBundle("synthetic", TensorImages(images, labels.numpy()), None, []), (images, labels)


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
    decode: str = MEMORY,
    jpeg_dir: str | None = None,
    workers: int = 0,
    amp: bool = True,
) -> dict | None:
    """Run on every rank of one launch: the timed steps; rank 0's result (None on the other ranks)."""
    import torch

    import losses
    from bench.config import experiment_from_dict
    from bench.device import resolve_device
    from bench.train import build_trainer
    from bench.train.distributed import process_group

    torch.set_num_threads(threads)
    with process_group(resolve_device(device).type) as dist:
        dev = dist.device if dist is not None else resolve_device(device)
        data = {"batch_size": batch_size, "samples_per_class": samples_per_class, "augment": decode != MEMORY}
        if decode != MEMORY:
            data.update(image_size=image_size, decode=decode, num_workers=workers)
        exp = experiment_from_dict(
            {
                "data": data,
                "model": {"backbone": backbone, "embedding_dim": embedding_dim, "freeze_bn": freeze_bn},
                "loss": {"name": loss},
                "train": {"chunk_size": chunk_size, "amp": amp},
            }
        )
        torch.backends.cudnn.benchmark = dev.type == "cuda"  # as a run sets it
        if decode == MEMORY:
            bundle, (images, labels) = _memory_case(batch_size, samples_per_class, image_size)
        else:  # each of the two epochs (warm-up, timed) long enough for its steps
            bundle = _jpeg_bundle(jpeg_dir, exp.data, batch_size * max(warmup, steps, 1))
        trainer, _ = build_trainer(exp, losses.get_loss(loss), bundle, dev, dist)
        trainer.model.train()
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        if decode == MEMORY:
            share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
            timed, peak = _time_steps(
                trainer, lambda _: repeat((images[share], labels[share])), warmup, steps
            )
        else:
            timed, peak = _time_steps(trainer, partial(_loader_epoch, trainer), warmup, steps)
        if rank != 0:
            return None
        totals = timed.sum(axis=1)
        return {
            "step": type(trainer.step).__name__,
            "step_s": totals.mean(),
            "fastest_s": totals.min(),
            "images_per_s": batch_size / totals.mean(),
            **timed.mean().to_dict(),
            "peak_mb": peak / 2**20,
        }


def _loader_epoch(trainer, epoch: int) -> Iterator:
    """A fresh pass of the run's loader over `epoch`, seeded as the trainer seeds it: its workers start cold
    and fill up, as at the start of every epoch of a run (they are not persistent)."""
    from bench.train.trainer import seed_everything

    trainer.sampler.set_epoch(epoch)
    seed_everything(trainer.exp.train.seed * 100_003 + epoch)
    return iter(trainer.loader)


def _time_steps(
    trainer, epoch_batches: Callable[[int], Iterator], warmup: int, steps: int
) -> tuple[pd.DataFrame, int]:
    """`warmup` untimed steps on the batches of epoch 0, then `steps` timed ones on epoch 1's: their split,
    and the peak memory in bytes over all of them (from before the first, which allocates the most)."""
    import resource

    import torch

    dev = trainer.device
    clock = StepClock(trainer, dev)
    cuda = dev.type == "cuda"
    if cuda:
        held = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if warmup:
        batches = epoch_batches(0)
        for _ in range(warmup):
            clock.step(trainer, batches)
        del batches  # its loader workers stop before the timed epoch's start
    batches = epoch_batches(1)
    timed = pd.DataFrame([clock.step(trainer, batches) for _ in range(steps)])
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) - held
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    clock.close()
    return timed, peak


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
    decodes: tuple[str, ...] = (MEMORY,),
    modes: tuple[str, ...] = (PLAIN, CHUNKED),
    jpeg_images: int = 512,
    jpeg_side: int = 500,
    workers: int | None = None,
    amp: bool = True,
    any_device: bool = False,
) -> pd.DataFrame:
    """One row per (processes, input, plain or chunked step): step time and its split, images/s, peak memory,
    and the ratios chunked / plain (peak memory) and N processes / 1 (images/s) between rows of one input.
    `any_device` lets tests time decode gpu on the CPU; no command exposes it."""
    import torch

    from bench.data.device_decode import check_decode_device

    if "gpu" in decodes:
        check_decode_device("gpu", torch.device(device), any_device=any_device)
    cores = os.cpu_count() or 1
    for count in processes:
        if batch_size // samples_per_class % count:
            raise ValueError(
                f"--nproc {count}: {batch_size // samples_per_class} classes per batch do not split by whole "
                "classes over that many processes"
            )
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-bench-jpegs-") as folder:
        if set(decodes) - {MEMORY}:
            write_jpegs(Path(folder), jpeg_images, jpeg_side)
        for count in processes:
            for decode in decodes:
                for mode in modes:
                    chunk = chunk_size if mode == CHUNKED else None
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
                        "threads": max(1, (threads or cores) // count),
                        "decode": decode,
                        "jpeg_dir": folder,
                        "workers": max(1, (workers or cores) // count),
                        "amp": amp,
                    }
                    row = {"processes": count, "decode": decode, "mode": mode, "chunk_size": chunk}
                    row.update(batch_size=batch_size, **_launch_case(args, count, timeout_s))
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
    result = _measure_case(**json.loads(sys.argv[1]))
    if result is not None:
        print(json.dumps(result), flush=True)
