"""`bench train`: each case trains with the step it names, images/s is the global batch over the step time,
the step's split adds up and puts each part where it belongs, JPEG inputs go through the run's loader (decoded
on the CPU or, here on the CPU's stand-in, the device), the ratios are taken against the right rows, and two
processes launched through torchrun report a result."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench.benchmarks import step_clock, train_bench
from bench.benchmarks.step_clock import PARTS, StepClock
from bench.benchmarks.train_bench import (
    TrainCase,
    TrainSetup,
    TrainSweep,
    format_table,
    measure_case,
    run_train_bench,
)
from bench.benchmarks.train_inputs import write_jpegs
from bench.cli import main
from bench.cli.parser import build_parser
from bench.config import ConfigError

TINY = TrainSetup(
    backbone="convnet",
    image_size=8,
    batch_size=16,
    samples_per_class=4,
    loss="smooth_ap",
    embedding_dim=8,
    freeze_bn=True,
    steps=2,
    warmup=1,
    device="cpu",
)


@pytest.mark.parametrize("chunk_size,step", [(None, "PlainStep"), (4, "CachedStep")])
def test_a_case_times_the_step_it_names(chunk_size, step):
    threads = torch.get_num_threads()
    result = measure_case(TrainCase(TINY, chunk_size=chunk_size))
    torch.set_num_threads(threads)  # the case sets its own
    assert result["step"] == step
    assert result["fastest_s"] <= result["step_s"]
    assert result["images_per_s"] == pytest.approx(16 / result["step_s"])
    assert result["peak_mb"] >= 0
    assert sum(result[part] for part in PARTS) == pytest.approx(result["step_s"])
    assert min(result["forward_s"], result["loss_s"], result["backward_s"], result["optimizer_s"]) > 0


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_jpeg_case_loads_through_the_runs_loader(tmp_path, decode):
    """Data wait is real loading; with decode gpu the decoding is part of the move to the device."""
    write_jpegs(tmp_path, 6, side=40)
    threads = torch.get_num_threads()
    result = measure_case(TrainCase(TINY, decode=decode, jpeg_dir=str(tmp_path), workers=0))
    torch.set_num_threads(threads)
    assert result["step"] == "PlainStep" and result["data_s"] > 0
    assert sum(result[part] for part in PARTS) == pytest.approx(result["step_s"])


def test_the_clock_puts_each_part_of_a_step_where_it_belongs(monkeypatch):
    """A fake step with known durations on a fake clock that only the step's parts advance (a real sleep
    overruns by any amount on a busy machine): forward 0.12 s, loss 0.03 s, backward 0.06 s, optimizer
    0.09 s, and nothing for the data or the move to the device."""
    clock = SimpleNamespace(now=100.0)

    def take(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(step_clock, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    class Takes(torch.nn.Module):
        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds = seconds
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, *inputs):
            take(self.seconds)
            return inputs[0]

    class SlowSGD(torch.optim.Optimizer):
        """Not a subclass of SGD: once any SGD exists in the process, SGD.step carries the hooks too, and a
        call through super() would fire them twice."""

        def __init__(self, params) -> None:
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            take(0.09)

    model, loss_fn = Takes(0.12), Takes(0.03)
    optimizer = SlowSGD(model.parameters())

    def step(trainer, images, labels):
        loss_fn(model(images))
        take(0.06)  # the backward pass
        optimizer.step()

    trainer = SimpleNamespace(forward_model=model, loss_fn=loss_fn, optimizer=optimizer, step=step)
    timer = StepClock(trainer, torch.device("cpu"))
    parts = timer.step(trainer, iter([(torch.zeros(1), torch.zeros(1))]))
    timer.close()
    expected = {"data_s": 0.0, "to_device_s": 0.0, "forward_s": 0.12, "loss_s": 0.03}
    assert parts == pytest.approx({**expected, "backward_s": 0.06, "optimizer_s": 0.09})
    assert not model._forward_hooks and not loss_fn._forward_pre_hooks  # close() leaves the modules as found


def test_decode_gpu_is_refused_on_a_cpu_before_any_launch(monkeypatch):
    monkeypatch.setattr(train_bench, "_launch_case", pytest.fail)
    with pytest.raises(ConfigError, match="data.decode: gpu .* device is cpu"):
        run_train_bench(TrainSetup(device="cpu"), TrainSweep(decodes=("memory", "gpu")), progress=False)


def test_a_gpu_decode_case_runs_end_to_end_in_its_own_launch():
    """The case arguments reach the launched process: JPEG folder, decode, workers (here on the CPU)."""
    sweep = TrainSweep(decodes=("gpu",), modes=("plain",), jpeg_images=4, jpeg_side=40, workers=1)
    table = run_train_bench(TINY, sweep, any_device=True, progress=False)
    assert list(table["status"]) == ["ok"], table["status"].tolist()
    assert list(table["decode"]) == ["gpu"] and table["data_s"].iloc[0] > 0
    assert "| 1 | gpu | plain |  | 16 |" in format_table(table)


def test_bench_train_flags_reach_the_paper_recipe():
    args = build_parser().parse_args(
        "bench train --backbone resnet50 --image-size 224 --batch-size 384 --samples-per-class 4 "
        "--precision bf16 --modes plain --decode memory,cpu,gpu --jpeg-images 64 --workers 8".split()
    )
    recipe = (args.backbone, args.image_size, args.batch_size, args.samples_per_class)
    assert recipe == ("resnet50", 224, 384, 4)
    assert args.decode == ("memory", "cpu", "gpu") and args.modes == ("plain",) and args.precision == "bf16"
    assert (args.jpeg_images, args.workers) == (64, 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "train", "--decode", "cpu,cuda"])


def test_two_processes_launched_by_torchrun_report_both_steps_side_by_side():
    table = run_train_bench(TINY, TrainSweep(processes=(2,), chunk_size=4), progress=False)
    assert list(table["status"]) == ["ok", "ok"], table["status"].tolist()
    assert list(table["mode"]) == ["plain", "chunked"] and list(table["step"]) == ["PlainStep", "CachedStep"]
    assert list(table["decode"]) == ["memory", "memory"]
    assert (table["images_per_s"] * table["step_s"]).tolist() == pytest.approx([16, 16])
    plain, chunked = table.itertuples()
    assert plain.peak_x_plain == 1.0 and chunked.peak_x_plain == pytest.approx(
        chunked.peak_mb / plain.peak_mb
    )
    assert table["speed_x_1proc"].isna().all()  # no one-process row to compare with
    assert "| 2 | memory | chunked | 4 | 16 |" in format_table(table)


def test_ratios_compare_the_right_rows(monkeypatch):
    """Peak memory against the plain step at the same process count and input; images/s against one process
    with the same step and input."""
    measured = {
        (1, None): {"step_s": 2.0, "peak_mb": 400.0},
        (1, 8): {"step_s": 4.0, "peak_mb": 100.0},
        (2, None): {"step_s": 1.0, "peak_mb": 300.0},
        (2, 8): {"step_s": 2.5, "peak_mb": 60.0},
    }
    slower = {"memory": 1.0, "cpu": 2.0}  # the cpu input's steps take twice as long, its peaks twice as high

    def fake_launch(case, processes, timeout_s):
        row = measured[(processes, case.chunk_size)]
        factor = slower[case.decode]
        step_s, peak_mb = row["step_s"] * factor, row["peak_mb"] * factor
        result = {"status": "ok", "step": "", "step_s": step_s, "fastest_s": step_s, "peak_mb": peak_mb}
        return {**result, "images_per_s": 32 / step_s}

    monkeypatch.setattr(train_bench, "_launch_case", fake_launch)
    inputs = ("memory", "cpu")
    sweep = TrainSweep(chunk_size=8, processes=(1, 2), decodes=inputs, jpeg_images=1)
    table = run_train_bench(TrainSetup(batch_size=32), sweep, progress=False)
    assert table["decode"].tolist() == ["memory", "memory", "cpu", "cpu"] * 2
    assert table["peak_x_plain"].tolist() == pytest.approx([1.0, 0.25, 1.0, 0.25, 1.0, 0.2, 1.0, 0.2])
    assert table["speed_x_1proc"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 2.0, 1.6, 2.0, 1.6])
    assert table["data_s"].isna().all()  # columns a case did not report stay empty


def test_bench_train_under_torchrun_is_refused_with_the_way_forward(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "train", "--nproc", "1,2"]) == 2
    assert "run it without torchrun, with --nproc N" in capsys.readouterr().err


def test_the_command_passes_its_input_flags_through(monkeypatch):
    seen = {}

    def fake_run(setup, sweep):
        seen.update(setup=setup, sweep=sweep)
        return None

    monkeypatch.setattr(train_bench, "run_train_bench", fake_run)
    monkeypatch.setattr(train_bench, "format_table", lambda table: "table")
    argv = ["bench", "train", "--device", "cpu", "--decode", "cpu,gpu", "--modes", "plain"]
    argv += ["--jpeg-images", "64", "--jpeg-side", "320", "--workers", "3", "--precision", "fp32"]
    assert main(argv) == 0
    sweep = seen["sweep"]
    assert sweep.decodes == ("cpu", "gpu") and sweep.modes == ("plain",)
    assert (sweep.jpeg_images, sweep.jpeg_side, sweep.workers, seen["setup"].amp) == (64, 320, 3, False)
