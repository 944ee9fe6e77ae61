"""The benchmark's B x B x B baseline computes the same Smooth-AP as ours (include_self=True)."""

import pandas as pd
import pytest
import torch

from bench.benchmarks.loss_bench import LossSweep, format_table, released_smooth_ap, run_loss_bench
from losses.smooth_ap import SmoothAP


def test_released_algorithm_equals_ours_with_self():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(3)
    emb = torch.nn.functional.normalize(torch.randn(15, 6, generator=gen, dtype=torch.float64), dim=1)
    a, b = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ours = SmoothAP(temperature=0.05, include_self=True)(a, labels)
    theirs = released_smooth_ap(b, num_classes=5, temperature=0.05)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-12
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_bench_table_has_ratios_and_skips_what_does_not_fit():
    sweep = LossSweep(
        batch_sizes=(16,),
        dim=8,
        losses=("smooth_ap", "smooth_ap_bbb"),
        repeats=2,
        min_seconds=0.05,
        threads=1,
        max_bbb_gb=1e-6,
    )
    table = run_loss_bench(sweep, progress=False)
    ours = table.set_index("loss").loc["smooth_ap"]
    assert ours["status"] == "ok" and ours["time_ms"] > 0 and ours["time_x_ours"] == 1.0
    # timed until both the pass count and the 50 ms budget are met: two passes only if they took 50 ms
    assert ours["passes"] > 2 or (ours["passes"] == 2 and ours["median_ms"] >= 25.0)
    assert ours["time_ms"] <= ours["median_ms"]
    assert table.set_index("loss").loc["smooth_ap_bbb", "status"].startswith("skipped")
    assert "| 16 | smooth_ap |" in format_table(table)


def test_backend_rows_run_ours_with_that_backend_and_count_sigmoids():
    sweep = LossSweep(
        batch_sizes=(16,),
        dim=8,
        losses=("smooth_ap", "smooth_ap_torch", "smooth_ap_triton", "triplet"),
        repeats=2,
        min_seconds=0.05,
        threads=1,
    )
    table = run_loss_bench(sweep, progress=False).set_index("loss")
    assert table.loc["smooth_ap_torch", "status"] == "ok"
    assert table.loc["smooth_ap_triton", "status"] == "skipped: the triton backend needs --device cuda"
    # 2 passes x 16 queries x 3 positives x 16 items
    expected = 2 * 16 * 3 * 16 / (table.loc["smooth_ap_torch", "time_ms"] * 1e6)
    assert table.loc["smooth_ap_torch", "gsig_per_s"] == pytest.approx(expected)
    assert pd.isna(table.loc["triplet", "gsig_per_s"])


def test_a_reduced_precision_row_reports_its_error_against_fp32(monkeypatch):
    """On a CPU TF32 changes nothing, so a TF32 row must report zero error; with products 0.1% off standing in
    for TF32's, the error against fp32 must show."""
    import bench.benchmarks.loss_bench as bench
    import losses._similarities

    monkeypatch.setitem(bench.BACKEND_ROWS, "smooth_ap_torch_tf32", {"backend": "torch", "tf32": True})
    case = {"batch": 64, "samples_per_class": 4, "dim": 16, "device": "cpu", "repeats": 1, "threads": 1}
    result = bench._measure_case("smooth_ap_torch_tf32", min_seconds=0.0, **case)
    assert result["loss_err"] == 0.0 and result["grad_rel_err"] == 0.0

    exact_gram = losses._similarities.Gram.apply
    monkeypatch.setattr(
        losses._similarities.Gram, "apply", lambda emb, tf32: exact_gram(emb, tf32) * (1.001 if tf32 else 1.0)
    )
    result = bench._measure_case("smooth_ap_torch_tf32", min_seconds=0.0, **case)
    assert result["loss_err"] > 1e-6 and result["grad_rel_err"] > 1e-4
