"""`bench train`: each case trains with the step it names, images/s is the global batch over the step time,
the ratios are taken against the right rows, and two processes launched through torchrun report a result."""

from __future__ import annotations

import pytest
import torch

from bench.benchmarks import train_bench
from bench.benchmarks.train_bench import _measure_case, format_table, run_train_bench
from bench.cli import main

TINY = {
    "backbone": "convnet",
    "image_size": 8,
    "batch_size": 16,
    "samples_per_class": 4,
    "loss": "smooth_ap",
    "embedding_dim": 8,
    "freeze_bn": True,
    "steps": 2,
    "warmup": 1,
    "device": "cpu",
    "threads": 1,
}


@pytest.mark.parametrize("chunk_size,step", [(None, "PlainStep"), (4, "CachedStep")])
def test_a_case_times_the_step_it_names(chunk_size, step):
    threads = torch.get_num_threads()
    result = _measure_case(chunk_size=chunk_size, **TINY)
    torch.set_num_threads(threads)  # the case sets its own
    assert result["step"] == step
    assert result["fastest_s"] <= result["step_s"]
    assert result["images_per_s"] == pytest.approx(16 / result["step_s"])
    assert result["peak_mb"] >= 0


def test_two_processes_launched_by_torchrun_report_both_steps_side_by_side():
    table = run_train_bench(
        processes=(2,), chunk_size=4, progress=False, **{k: v for k, v in TINY.items() if k != "threads"}
    )
    assert list(table["status"]) == ["ok", "ok"], table["status"].tolist()
    assert list(table["mode"]) == ["plain", "chunked"] and list(table["step"]) == ["PlainStep", "CachedStep"]
    assert (table["images_per_s"] * table["step_s"]).tolist() == pytest.approx([16, 16])
    plain, chunked = table.itertuples()
    assert plain.peak_x_plain == 1.0 and chunked.peak_x_plain == pytest.approx(
        chunked.peak_mb / plain.peak_mb
    )
    assert table["speed_x_1proc"].isna().all()  # no one-process row to compare with
    assert "| 2 | chunked | 4 | 16 |" in format_table(table)


def test_ratios_compare_the_right_rows(monkeypatch):
    """Peak memory against the plain step at the same process count; images/s against one process."""
    measured = {
        (1, None): {"step_s": 2.0, "peak_mb": 400.0},
        (1, 8): {"step_s": 4.0, "peak_mb": 100.0},
        (2, None): {"step_s": 1.0, "peak_mb": 300.0},
        (2, 8): {"step_s": 2.5, "peak_mb": 60.0},
    }

    def fake_launch(args, processes, timeout_s):
        row = measured[(processes, args["chunk_size"])]
        return {
            "status": "ok",
            "step": "",
            "fastest_s": row["step_s"],
            "images_per_s": 32 / row["step_s"],
            **row,
        }

    monkeypatch.setattr(train_bench, "_launch_case", fake_launch)
    table = run_train_bench(batch_size=32, chunk_size=8, processes=(1, 2), progress=False)
    assert table["peak_x_plain"].tolist() == pytest.approx([1.0, 0.25, 1.0, 0.2])
    assert table["speed_x_1proc"].tolist() == pytest.approx([1.0, 1.0, 2.0, 1.6])


def test_bench_train_under_torchrun_is_refused_with_the_way_forward(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "train", "--nproc", "1,2"]) == 2
    assert "run it without torchrun, with --nproc N" in capsys.readouterr().err
