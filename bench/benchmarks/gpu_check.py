"""`smoothap-bench bench gpu-check`: everything a GPU should show, in one command under one time budget.

Device machines are lent for minutes, so the check is prepared here and run in one call: it records the
environment, runs the GPU tests, then each benchmark as its own process under its own time limit (the
stage's limit or what is left of the budget, whichever is less; a stage past it is killed with its process
group and the rest go on). Each stage writes its result as JSON (`--json`, which every bench command takes);
`report.json` and `report.md` list each figure against its target. `--dry-run` runs nothing and lists every
stage with its time limit and the figures it will produce.

Targets are those of issue 23 for an H100: Smooth-AP fwd+bwd within 5 ms at B = 8192 and 100 ms at 65,536;
the others are comparisons (gradient caching takes less memory than the plain step; decoding and evaluation
on the GPU are faster than on the CPU and than PML) or figures recorded for the README.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.benchmarks.gpu_stages import Stage, faiss_on_gpu, stages
from bench.benchmarks.output import plain


@dataclass
class StageResult:
    name: str
    limit_s: float
    status: str = "skipped"
    seconds: float = 0.0
    outputs: list[Any] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


def environment() -> dict:
    """What the figures depend on: versions, the GPU, the compiler Triton needs, the commit."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "c_compiler": shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"),
    }
    for package in ("torchvision", "triton", "faiss", "pytorch_metric_learning"):
        try:
            env[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            env[package] = None
    env["faiss_gpu"] = faiss_on_gpu()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1)}
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpus"] = torch.cuda.device_count()
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=15)
        env["nvidia_smi"] = done.stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    env["commit"] = commit.stdout.strip() or None
    return env


def _read_output(path: Path) -> Any:
    if not path.exists():
        return None
    if path.suffix == ".xml":  # a pytest JUnit report: its totals, and the names of what failed
        suite = ElementTree.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "skipped", "failures", "errors")}
        return (
            f"{counts['tests']} tests, {counts['skipped']} skipped, {counts['failures']} failed, "
            f"{counts['errors']} errors"
        )
    return json.loads(path.read_text())


def _run_command(command: list[str], log: Path, seconds: float) -> str:
    """'ok', 'failed (exit N)' or 'timeout': the command in its own process group, all of it killed at the
    limit (torchrun and its ranks, a case's subprocess)."""
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "timeout"
    return "ok" if code == 0 else f"failed (exit {code})"


def run_stage(stage: Stage, folder: Path, seconds: float) -> StageResult:
    """The stage's commands one after another within `seconds`."""
    result = StageResult(stage.name, stage.limit_s)
    start = time.monotonic()
    for index, command in enumerate(stage.commands):
        out = folder / f"{stage.name}-{index}{stage.suffix}"
        log = folder / f"{stage.name}-{index}.log"
        left = seconds - (time.monotonic() - start)
        status = _run_command([part.replace("{out}", str(out)) for part in command], log, left)
        result.outputs.append(_read_output(out))
        result.logs.append(str(log))
        if status != "ok":
            result.status = (
                "ok (search ended)" if stage.search and index > 0 and status != "timeout" else status
            )
            break
        result.status = "ok"
    result.seconds = round(time.monotonic() - start, 1)
    return result


def figures(stage: Stage, result: StageResult) -> list[dict]:
    rows = []
    for figure in stage.figures:
        try:
            value = figure.read(result.outputs)
        except (KeyError, TypeError, ValueError, AttributeError):
            value = None
        met = None if value is None or figure.meets is None else bool(figure.meets(value))
        rows.append({"stage": stage.name, "figure": figure.name, "value": value, "target": figure.target,
                     "met": met, "stage_status": result.status})  # fmt: skip
    return rows


def dry_run_text(all_stages: list[Stage], budget: float) -> str:
    lines = [f"bench gpu-check: {len(all_stages)} stages within {budget:g} s"]
    for stage in all_stages:
        lines.append(f"{stage.name}: limit {stage.limit_s:g} s, {len(stage.commands)} command(s)")
        lines += [f"  figure: {figure.name} (target: {figure.target})" for figure in stage.figures]
        lines.append(f"  first command: {' '.join(stage.commands[0])}")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check on {report['machine']}",
        "",
        f"{env.get('gpu')} ({env.get('gpu_memory_gb')} GB, sm {env.get('capability')}), "
        f"torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
        f"faiss {env.get('faiss')} (GPU: {env.get('faiss_gpu')}), commit {env.get('commit')}; "
        f"budget {report['budget_s']:g} s, {report['seconds']:g} s used. Command: `{report['command']}`.",
        "",
        "| stage | figure | value | target | met | stage status |",
        "|---|---|---:|---|---|---|",
    ]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    for row in report["figures"]:
        met = {True: "yes", False: "no", None: ""}[row["met"]]
        lines.append(
            f"| {row['stage']} | {row['figure']} | {cell(row['value'])} | {row['target']} | {met} "
            f"| {row['stage_status']} |"
        )
    lines += ["", "| stage | limit s | used s | status |", "|---|---:|---:|---|"]
    lines += [
        f"| {s['name']} | {s['limit_s']:g} | {s['seconds']:g} | {s['status']} |" for s in report["stages"]
    ]
    return "\n".join(lines) + "\n"


def run_gpu_check(
    out: str,
    budget: float = 480.0,
    machine: str | None = None,
    dry_run: bool = False,
    json_path: str | None = None,
    all_stages: list[Stage] | None = None,
    only: list[str] | None = None,
) -> int:
    """Run every stage (or those named in `only`) within `budget` seconds and write report.json and report.md
    under `out`; 0 when every stage ran and every target with a value was met."""
    all_stages = stages() if all_stages is None else all_stages
    if only:
        unknown = sorted(set(only) - {stage.name for stage in all_stages})
        if unknown:
            names = ", ".join(stage.name for stage in all_stages)
            raise ValueError(f"bench gpu-check --only: no stage {', '.join(unknown)}; the stages are {names}")
        all_stages = [stage for stage in all_stages if stage.name in only]
    if dry_run:
        print(dry_run_text(all_stages, budget))
        return 0
    folder = Path(out)
    (folder / "stages").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = environment()
    results, rows = [], []
    for stage in all_stages:
        left = budget - (time.monotonic() - start)
        if left < 1:
            result = StageResult(stage.name, stage.limit_s, "skipped: budget spent")
        else:
            result = run_stage(stage, folder / "stages", min(stage.limit_s, left))
        print(f"{stage.name}: {result.status} ({result.seconds:g} s)", flush=True)
        results.append(result)
        rows += figures(stage, result)
    report = {
        "machine": machine or env.get("gpu") or platform.node(),
        "command": " ".join(["smoothap-bench", "bench", "gpu-check", "--budget", f"{budget:g}"]),
        "budget_s": budget,
        "seconds": round(time.monotonic() - start, 1),
        "environment": env,
        "stages": [vars(result) for result in results],
        "figures": rows,
    }
    (folder / "report.json").write_text(json.dumps(plain(report), indent=1))
    (folder / "report.md").write_text(report_markdown(report))
    if json_path:
        Path(json_path).write_text(json.dumps(plain(report), indent=1))
    print(report_markdown(report))
    ran = all(result.status.startswith("ok") for result in results)
    return 0 if ran and all(row["met"] is not False for row in rows) else 1
