"""`--workers N`: N tuning processes on this machine, sharing the same studies.

One worker per GPU, pinned with CUDA_VISIBLE_DEVICES (round-robin when there are more workers than GPUs), or
N CPU workers with the machine's cores split between them. The studies and their MLflow parent runs are
created here, before any worker starts, so workers only load them (Optuna issue #1092: processes racing to
create the tables or a study fail). Every worker runs `tune_losses` on the same job (`TuneJob`), so budgets
stay exactly equal: a worker claims a trial only while fewer than `budget` live trials precede it. The same
command on other machines with the same PostgreSQL `--storage` joins the same studies.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import layout
from bench.config import ConfigError
from bench.device import resolve_device
from bench.tune.job import TuneJob
from bench.tune.runner import LossTuner, tune_losses
from bench.tune.space import for_loss
from bench.tune.study import StorageLost, open_storage

if TYPE_CHECKING:  # MLflow is imported by the caller that builds the tracker
    from bench.data import DatasetBundle
    from bench.tracking import Tracker

Log = Callable[[str], None]
EXIT_STORAGE_LOST = 3  # a worker's exit status when the Optuna database stayed away


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker runs: its CUDA_VISIBLE_DEVICES pin (None on the CPU) and its torch threads."""

    index: int
    gpu: str | None
    threads: int

    def describe(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        return f"{where}, {self.threads} thread{'s' if self.threads > 1 else ''}"


@dataclass(frozen=True)
class TrackingTarget:
    """What a worker needs to log to the parent's MLflow experiment (a Tracker itself does not pickle)."""

    uri: str
    experiment: str
    spool_dir: Path


@dataclass(frozen=True)
class WorkerJob:
    """What every worker process receives (pickled): the job, where to log, and the dataset when it is held
    in memory (None: each worker reads it itself)."""

    tune: TuneJob
    tracking: TrackingTarget | None
    bundle: DatasetBundle | None


@dataclass(frozen=True)
class WorkerExit:
    slot: WorkerSlot
    pid: int
    code: int  # the exit status; minus the signal's number when a signal ended it

    def describe(self) -> str:
        how = f"was killed by signal {-self.code}" if self.code < 0 else f"exited with status {self.code}"
        return f"worker {self.slot.index} (pid {self.pid}, {self.slot.describe()}) {how}"


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: its own CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    import torch

    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [gpu.strip() for gpu in pinned.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def worker_slots(
    workers: int, device: str = "auto", cpus: int | None = None, gpus: Sequence[str] | None = None
) -> list[WorkerSlot]:
    """One slot per worker: GPUs dealt round-robin when `device` resolves to CUDA (`gpus`, default
    `visible_gpus()`), and the `cpus` (default: those this process may use) split evenly, at least one
    each."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if gpus is None:
        gpus = visible_gpus() if resolve_device(device).type == "cuda" else []
    threads = max(1, (cpus or available_cpus()) // workers)
    return [WorkerSlot(i, gpus[i % len(gpus)] if gpus else None, threads) for i in range(workers)]


def in_memory(bundle: DatasetBundle) -> bool:
    """Whether every split of `bundle` is a tensor dataset, which reaches the workers through shared memory.
    File lists are cheap to read again, and their corrupt-image counters belong to one process tree."""
    from bench.data.omniglot import TensorImages

    splits = [split for split in [bundle.val, *bundle.tests] if split is not None]
    parts = [bundle.train] + [part for split in splits for part in (split.query, split.gallery)]
    return all(isinstance(part, TensorImages) for part in parts if part is not None)


def time_left(timeout: float | None, started: float) -> float | None:
    """What remains of `timeout` seconds counted from `started` (time.monotonic); None without a timeout."""
    return None if timeout is None else max(0.0, timeout - (time.monotonic() - started))


def tune_in_workers(
    job: TuneJob,
    *,
    tracker: Tracker | None = None,
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
) -> list[WorkerExit]:
    """Tune the job's losses in `job.workers` processes until every study has its budget (or the timeout
    passes); how each worker ended.

    A worker that dies leaves its trial to the heartbeat check and its share of the budget to the others.
    Call `tune_losses` afterwards, as without workers (`bench.pipeline.tune` does): it finds the budgets
    finished (or finishes what dead workers left) and closes the studies' MLflow runs. A dataset held in
    memory (Omniglot) is read once, here, and shared; image files are listed again by each worker. The job's
    `loss_modules` (files) are loaded in every worker; losses registered otherwise in this process are not
    seen there.
    """
    from bench.data import load_dataset

    slots = worker_slots(job.workers, job.device)
    bundle = bundle or load_dataset(job.exp.data)
    rdb = open_storage(job.storage, job.heartbeat_interval, job.grace_period)
    for loss in job.losses:  # each study and its MLflow parent run made once, before any worker opens it
        LossTuner(for_loss(job.exp, loss), rdb, tracker, bundle, device=job.device, name=job.study_name)
    if log and layout.sqlite_path(job.storage) is not None:
        log("[workers] SQLite serves workers of one machine only; PostgreSQL shares studies across machines")
    tracking = None
    if tracker is not None:
        tracking = TrackingTarget(tracker.uri, tracker.experiment, tracker.spool.folder)
    shared = bundle if in_memory(bundle) else None
    return _run_processes(WorkerJob(job, tracking, shared), slots, log)


def _run_processes(job: WorkerJob, slots: list[WorkerSlot], log: Log | None) -> list[WorkerExit]:
    """Start one process per slot and wait for all (spawned: CUDA cannot be forked); Ctrl-C stops them."""
    import torch.multiprocessing

    context = torch.multiprocessing.get_context("spawn")  # tensors of the dataset travel by shared memory
    processes = [
        context.Process(target=run_worker, args=(job, slot), name=f"tune-worker-{slot.index}")
        for slot in slots
    ]
    try:
        for process, slot in zip(processes, slots, strict=True):
            process.start()
            if log:
                log(f"[workers] worker {slot.index}: pid {process.pid}, {slot.describe()}")
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        raise
    exits = [WorkerExit(slot, p.pid, p.exitcode) for p, slot in zip(processes, slots, strict=True)]
    for ended in exits:
        if ended.code != 0 and log:
            log(f"[workers] {ended.describe()}")
    return exits


def run_worker(job: WorkerJob, slot: WorkerSlot) -> None:
    """One worker process: pinned to its GPU before CUDA starts, on its share of the cores, tuning until
    every study has its budget. A database that stays away ends it with status EXIT_STORAGE_LOST.

    Ctrl-C reaches the whole process group: a worker ignores it and the parent stops the workers (SIGTERM,
    which exits through Python's shutdown, releasing what the worker holds), so the command ends with the
    parent's one line rather than a traceback from every worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
    import torch

    torch.set_num_threads(slot.threads)
    if job.tune.loss_modules:
        import losses

        for path in job.tune.loss_modules:
            losses.load_loss_module(path)
    tracker = None
    if job.tracking is not None:
        from bench.tracking import Tracker

        target = job.tracking
        tracker = Tracker(target.uri, target.experiment, create=False, spool_dir=target.spool_dir)

    def log(line: str) -> None:
        print(f"[worker {slot.index}] {line}", flush=True)

    try:
        tune_losses(job.tune, tracker=tracker, bundle=job.bundle, log=log)
    except StorageLost as error:
        print(f"[worker {slot.index}] {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STORAGE_LOST)
