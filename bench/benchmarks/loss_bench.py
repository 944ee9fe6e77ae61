"""`smoothap-bench bench loss`: forward+backward time and peak memory of every loss, side by side.

Compared: our Smooth-AP (B * P * B; `smooth_ap` is its default `auto` backend, and on CUDA its two paths
run side by side as `smooth_ap_torch` and `smooth_ap_triton`), a re-implementation of the authors' released
B x B x B algorithm, pytorch-metric-learning's SmoothAPLoss (the same B^3 algorithm) and every other
registered loss. Batches are `samples_per_class` contiguous samples per class (the layout the B^3 versions
need), D-dim unit vectors. For the Smooth-AP rows `gsig_per_s` counts the ranking's sigmoids, B x (K - 1) x B
forward and as many backward, per second of the whole pass (in billions): set against the device's
exponential throughput it gives the fraction of that bound reached (the time includes the two B x B x D
similarity products).

`smooth_ap_triton_tf32` computes the similarity products in TF32 and also reports its loss error and its
largest gradient error (relative to the largest fp32 gradient entry) against the same pass in fp32.

GPU run of the issue's cases (K = 4, D = 512): `smoothap-bench bench loss --device cuda --batch-sizes
1024,8192,65536 --losses smooth_ap_torch,smooth_ap_triton,smooth_ap_triton_tf32`; add larger sizes (98304,
131072) to find the largest that fits: a case that runs out of memory says so in its status.

Each (loss, batch size) case runs in a fresh subprocess, so its peak memory is its own:
- CPU: growth of the process's resident-set high-water mark (getrusage ru_maxrss) over the case, measured
  after torch is imported and the inputs exist. It includes allocator slack, so it is an upper bound.
- CUDA: torch.cuda.max_memory_allocated above the memory held before the case.
Time is the fastest forward+backward pass after one warm-up pass: the least disturbed by other processes on
a shared machine. Each case runs at least `repeats` passes and keeps going until `min_seconds` of passes
are timed, as timeit does, so a millisecond case gets enough draws to find an undisturbed one; the median
is reported beside the minimum to show how noisy the machine was. `threads` sets torch's intra-op threads
in each case (CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

OURS = "smooth_ap"
BBB = "smooth_ap_bbb"  # the released code's B x B x B algorithm, re-implemented
PML = "smooth_ap_pml"
BACKEND_ROWS = {  # ours with its backend fixed, and the Triton path with TF32 similarity products
    "smooth_ap_torch": {"backend": "torch"},
    "smooth_ap_triton": {"backend": "triton"},
    "smooth_ap_triton_tf32": {"backend": "triton", "tf32": True},
}
REPO_ROOT = Path(__file__).resolve().parents[2]


def released_smooth_ap(embeddings: Tensor, num_classes: int, temperature: float = 0.01) -> Tensor:
    """The released Smooth-AP algorithm: B x B x B sigmoid tensors; classes must be equal contiguous blocks.

    Written from the paper's description of the released code (query counted among its own positives and
    in its retrieval set), as the baseline our O(B * P * B) version is measured against.
    """
    batch, dim = embeddings.shape
    group = batch // num_classes
    sims = embeddings @ embeddings.T
    not_self = 1.0 - torch.eye(batch, device=embeddings.device)
    # all[q, i, j] = s_qj - s_qi for every query q and items i, j
    diff_all = sims.unsqueeze(1).repeat(1, batch, 1) - sims.unsqueeze(2).repeat(1, 1, batch)
    rank_all = (torch.sigmoid(diff_all / temperature) * not_self.unsqueeze(0)).sum(-1) + 1.0
    blocks = embeddings.view(num_classes, group, dim)
    sims_pos = blocks @ blocks.transpose(1, 2)  # [class, query, positive]
    not_self_pos = 1.0 - torch.eye(group, device=embeddings.device)
    diff_pos = sims_pos.unsqueeze(2).repeat(1, 1, group, 1) - sims_pos.unsqueeze(3).repeat(1, 1, 1, group)
    rank_pos = (torch.sigmoid(diff_pos / temperature) * not_self_pos).sum(-1) + 1.0
    block_ranks = torch.stack(
        [rank_all[c * group : (c + 1) * group, c * group : (c + 1) * group] for c in range(num_classes)]
    )
    ap = (rank_pos / block_ranks).sum(-1) / group
    return 1.0 - ap.mean()


def _bbb_bytes(batch: int) -> int:
    """Rough peak of the B^3 algorithm: about eight float32 B^3 tensors alive (forward and saved for
    backward)."""
    return 8 * 4 * batch**3


def _build(name: str, batch: int, samples_per_class: int):
    """A callable (embeddings, labels) -> loss for one benchmark entry."""
    if name == BBB:
        classes = batch // samples_per_class
        return lambda emb, labels: released_smooth_ap(emb, classes)
    if name == PML:
        from pytorch_metric_learning.losses import SmoothAPLoss

        return SmoothAPLoss(temperature=0.01)
    from losses import get_loss

    if name in BACKEND_ROWS:
        return get_loss(OURS, **BACKEND_ROWS[name])

    return get_loss(name)


def _measure_case(
    name: str,
    batch: int,
    samples_per_class: int,
    dim: int,
    device: str,
    repeats: int,
    threads: int | None,
    min_seconds: float,
) -> dict:
    """Run in a fresh process: time and peak memory of forward+backward for one case."""
    import resource
    import time

    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device)
    labels = torch.arange(batch // samples_per_class).repeat_interleave(samples_per_class).to(device)
    loss_fn = _build(name, batch, samples_per_class)
    cuda = device.startswith("cuda")

    def step() -> None:
        emb = base.clone().requires_grad_(True)
        loss_fn(emb, labels).backward()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step()
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - held
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    times.sort()
    result = {
        "time_ms": 1000 * times[0],
        "median_ms": 1000 * times[len(times) // 2],
        "passes": len(times),
        "peak_mb": peak / 2**20,
    }
    if BACKEND_ROWS.get(name, {}).get("tf32"):
        result.update(_error_against_fp32(name, loss_fn, base, labels))
    return result


def _error_against_fp32(name: str, loss_fn, base: Tensor, labels: Tensor) -> dict:
    """|loss - fp32 loss| and max |grad - fp32 grad| / max |fp32 grad| of a reduced-precision row."""
    from losses import get_loss

    exact = {**BACKEND_ROWS[name], "tf32": False}
    values = []
    for fn in (loss_fn, get_loss(OURS, **exact)):
        emb = base.clone().requires_grad_(True)
        loss = fn(emb, labels)
        loss.backward()
        values.append((loss.item(), emb.grad))
    (loss, grad), (ref_loss, ref_grad) = values
    return {
        "loss_err": abs(loss - ref_loss),
        "grad_rel_err": ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item(),
    }


def _run_case_subprocess(args: dict, timeout_s: float) -> dict:
    code = (
        "import json, sys; from bench.benchmarks.loss_bench import _measure_case; "
        "print(json.dumps(_measure_case(**json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {timeout_s:.0f}s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"status": f"error: {last[:120]}"}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


@dataclass(frozen=True)
class LossSweep:
    """The cases of one command: every loss at every batch size, and how each case is timed."""

    batch_sizes: tuple[int, ...] = (224, 384, 1024, 4096, 8192)
    samples_per_class: int = 4
    dim: int = 512
    device: str = "cpu"
    # registry names plus "smooth_ap_bbb" (the released B x B x B algorithm), "smooth_ap_pml" and the
    # backend rows; None: all
    losses: tuple[str, ...] | None = None
    repeats: int = 3
    min_seconds: float = 1.0
    threads: int | None = None
    max_bbb_gb: float = 4.0  # the B^3 versions are skipped where their estimated memory exceeds this
    timeout_s: float = 600.0

    def names(self) -> list[str]:
        """The losses to time, ours first."""
        from losses import available_losses

        backends = list(BACKEND_ROWS) if self.device.startswith("cuda") else []
        return list(self.losses or [OURS, *backends, BBB, PML] + [n for n in available_losses() if n != OURS])


def run_loss_bench(sweep: LossSweep = LossSweep(), progress: bool = True) -> pd.DataFrame:
    """One row per (batch size, loss) with time_ms, peak_mb, their ratios to ours, and a status."""
    names, rows = sweep.names(), []
    for batch in sweep.batch_sizes:
        if batch % sweep.samples_per_class:
            raise ValueError(
                f"batch size {batch} is not a multiple of samples_per_class={sweep.samples_per_class}"
            )
        for name in names:
            row = {"batch_size": batch, "loss": name, **_case(sweep, name, batch)}
            if progress:
                print(_format_row(row), file=sys.stderr, flush=True)
            rows.append(row)
    return _with_ratios(pd.DataFrame(rows), sweep.samples_per_class)


def _case(sweep: LossSweep, name: str, batch: int) -> dict:
    """One case's measurements and status, or the status saying why it is skipped."""
    if name in (BBB, PML) and _bbb_bytes(batch) > sweep.max_bbb_gb * 2**30:
        return {"status": f"skipped: ~{_bbb_bytes(batch) / 2**30:.0f} GB B^3 tensors > {sweep.max_bbb_gb} GB"}
    if BACKEND_ROWS.get(name, {}).get("backend") == "triton" and not sweep.device.startswith("cuda"):
        return {"status": "skipped: the triton backend needs --device cuda"}
    args = {
        "name": name,
        "batch": batch,
        "samples_per_class": sweep.samples_per_class,
        "dim": sweep.dim,
        "device": sweep.device,
        "repeats": sweep.repeats,
        "threads": sweep.threads,
        "min_seconds": sweep.min_seconds,
    }
    return _run_case_subprocess(args, sweep.timeout_s)


def _with_ratios(table: pd.DataFrame, samples_per_class: int) -> pd.DataFrame:
    """The table's columns in order, with time and peak memory against ours at the same batch size and the
    Smooth-AP rows' sigmoid throughput."""
    for column in ("time_ms", "median_ms", "passes", "peak_mb", "loss_err", "grad_rel_err"):
        if column not in table:
            table[column] = float("nan")
    ours = table[table["loss"] == OURS].set_index("batch_size")
    table["time_x_ours"] = table["time_ms"] / table["batch_size"].map(ours["time_ms"])
    table["peak_x_ours"] = table["peak_mb"] / table["batch_size"].map(ours["peak_mb"])
    sigmoids = 2 * table["batch_size"] ** 2 * (samples_per_class - 1)
    smooth_ap_rows = table["loss"].isin([OURS, *BACKEND_ROWS])
    table["gsig_per_s"] = (sigmoids / (table["time_ms"] * 1e6)).where(smooth_ap_rows)
    columns = [
        "batch_size",
        "loss",
        "time_ms",
        "median_ms",
        "passes",
        "peak_mb",
        "time_x_ours",
        "peak_x_ours",
        "gsig_per_s",
        "loss_err",
        "grad_rel_err",
    ]
    return table[columns + ["status"]]


def _format_row(row: dict) -> str:
    if row.get("status") != "ok":
        return f"B={row['batch_size']:>6} {row['loss']:<36} {row.get('status')}"
    return (
        f"B={row['batch_size']:>6} {row['loss']:<36} {row['time_ms']:10.2f} ms "
        f"(median {row['median_ms']:.2f}, {row['passes']} passes) {row['peak_mb']:10.1f} MB"
    )


def _errors(row) -> str:
    """'loss error, relative gradient error' of a reduced-precision row; blank elsewhere."""
    return "" if pd.isna(row.loss_err) else f"{row.loss_err:.1e}, {row.grad_rel_err:.1e}"


def format_table(df: pd.DataFrame) -> str:
    """Markdown table; ratios are relative to our Smooth-AP at the same batch size."""
    lines = [
        "| B | loss | fwd+bwd ms (fastest) | median ms | passes | peak MB "
        "| time / ours | peak / ours | Gsigmoid/s | loss, grad error vs fp32 | status |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]

    def num(value: float, digits: int) -> str:
        return "" if pd.isna(value) else f"{value:.{digits}f}"

    for row in df.itertuples():
        lines.append(
            f"| {row.batch_size} | {row.loss} | {num(row.time_ms, 2)} | {num(row.median_ms, 2)} | "
            f"{num(row.passes, 0)} | {num(row.peak_mb, 1)} | "
            f"{num(row.time_x_ours, 1)} | {num(row.peak_x_ours, 1)} | {num(row.gsig_per_s, 1)} | "
            f"{_errors(row)} | {row.status} |"
        )
    return "\n".join(lines)
