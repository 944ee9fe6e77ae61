"""`bench gpu-check`: the dry run lists every stage with its limit and figures, and the runner keeps each
stage within its limit and the budget and writes both reports; every bench command takes --json and
--timeout."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from bench.benchmarks.gpu_check import run_gpu_check
from bench.benchmarks.gpu_stages import Figure, Stage, stages
from bench.benchmarks.output import BenchTimeout, time_limit
from bench.cli import build_parser, main


def test_dry_run_lists_every_stage_its_limit_and_the_figures_issue_23_asks_for(capsys):
    assert main(["bench", "gpu-check", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = stages()
    assert sum(stage.limit_s for stage in listed) <= 480  # the default budget holds every stage
    for stage in listed:
        assert f"{stage.name}: limit {stage.limit_s:g} s" in out
        for figure in stage.figures:
            assert f"figure: {figure.name} (target: {figure.target})" in out
    for wanted in (
        "B=8,192 smooth_ap_torch",
        "B=8,192 smooth_ap_triton (ms) (target: <= 5 ms on an H100)",
        "B=65,536 smooth_ap_triton_tf32 (ms) (target: <= 100 ms on an H100)",
        "largest Smooth-AP batch",
        "ResNet-50 224px plain step",
        "gradient-cached / plain",
        "largest gradient-cached batch",
        "decoded on the GPU",
        "evaluation of 60,502 x 512 (PML",
        "evaluation of 136,093 x 512 (ours, torch on the GPU",
        "GPU tests",
    ):
        assert wanted in out, wanted


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_runner_limits_each_stage_reads_figures_and_writes_both_reports(tmp_path):
    write = (
        "import json, sys; "
        "json.dump([{'batch_size': %d, 'status': 'ok', 'time_ms': %s}], open(sys.argv[1], 'w'))"
    )

    def first_ms(outputs):
        return outputs[0][0]["time_ms"]

    fast = Stage("fast", 60, [python(write % (8, "3.5")) + ["{out}"]],
                 [Figure("fwd+bwd (ms)", "<= 5 ms", first_ms, lambda v: v <= 5)])  # fmt: skip
    slow_figure = Figure("never written", "<= 1 ms", first_ms, lambda v: v <= 1)
    pid_file = tmp_path / "slow.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    slow = Stage("slow", 2, [python(sleeper)], [slow_figure])
    search = Stage(
        "search",
        60,
        [python(write % (b, "1.0")) + ["{out}"] for b in (2, 4)] + [python("raise SystemExit(3)")],
        [Figure("largest", "recorded", lambda outs: max(o[0]["batch_size"] for o in outs if o))],
        search=True,
    )
    after_budget = Stage("late", 60, [python("pass")], [])
    code = run_gpu_check(str(tmp_path), 300, "test machine", all_stages=[fast, slow, search])
    with pytest.raises(ProcessLookupError):  # the sleeping stage was killed at its limit
        os.kill(int(pid_file.read_text()), 0)
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {stage["name"]: stage["status"] for stage in report["stages"]}
    assert statuses == {"fast": "ok", "slow": "timeout", "search": "ok (search ended)"}
    values = {row["figure"]: (row["value"], row["met"]) for row in report["figures"]}
    assert values == {"fwd+bwd (ms)": (3.5, True), "never written": (None, None), "largest": (4, None)}
    assert code == 1  # a stage timed out
    markdown = (tmp_path / "report.md").read_text()
    assert "# GPU check on test machine" in markdown
    assert "| fast | fwd+bwd (ms) | 3.50 | <= 5 ms | yes | ok |" in markdown
    assert report["environment"]["torch"]
    run_gpu_check(str(tmp_path / "spent"), 0.5, None, all_stages=[after_budget])
    spent = json.loads((tmp_path / "spent" / "report.json").read_text())
    assert spent["stages"][0]["status"] == "skipped: budget spent"
    run_gpu_check(str(tmp_path / "only"), 300, None, all_stages=[fast, after_budget], only=["late"])
    only = json.loads((tmp_path / "only" / "report.json").read_text())
    assert [stage["name"] for stage in only["stages"]] == ["late"]
    with pytest.raises(ValueError, match="no stage nope; the stages are fast, late"):
        run_gpu_check(str(tmp_path / "x"), 300, None, all_stages=[fast, after_budget], only=["nope"])


@pytest.mark.parametrize("command", ["loss", "eval", "data", "train", "gpu-check"])
def test_every_bench_command_takes_json_and_timeout(command):
    extra = ["--synthetic"] if command == "data" else []
    args = build_parser().parse_args(["bench", command, *extra, "--json", "out.json", "--timeout", "12.5"])
    assert (args.json, args.timeout) == ("out.json", 12.5)


def test_time_limit_stops_the_block():
    with pytest.raises(BenchTimeout, match="--timeout 0.2"), time_limit(0.2):
        while True:
            time.sleep(0.01)
    with time_limit(None):
        pass
