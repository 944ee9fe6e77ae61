"""The handlers behind `smoothap-bench`: each turns parsed arguments into one library call and prints.

Heavy imports (torch, MLflow, Optuna) happen inside the handlers, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse

from bench import layout


def load_loss_modules(args: argparse.Namespace) -> None:
    """`--loss-module` files, imported and checked before the config or any data is read."""
    if args.loss_modules:
        import losses

        for path in args.loss_modules:
            losses.load_loss_module(path)


def experiment_from_args(args: argparse.Namespace):
    """Load the config with overrides; command-line shortcuts win over --set."""
    from bench.config import load_experiment

    overrides = list(args.overrides)
    if getattr(args, "loss", None):
        overrides.append(f"loss.name={args.loss}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    return load_experiment(args.config, overrides)


def main_job_experiment(args: argparse.Namespace):
    """The experiment `run` works on: --quick's budget and --experiment-name applied before --set."""
    from bench.pipeline import main_job_overrides

    args.overrides = main_job_overrides(args.quick, args.experiment_name, args.overrides)
    return experiment_from_args(args)


def make_tracker(args: argparse.Namespace, exp):
    from bench.tracking import Tracker

    uri = layout.tracking_uri(args.tracking_uri, exp.tracking.uri)
    return Tracker(uri, exp.tracking.experiment, exp.tracking.artifact_location)


def _shown_uri(uri: str) -> str:
    from bench.tracking import redact

    return redact(uri)


def _loss_list(text: str | None) -> list[str]:
    """`--losses a,b` (a named set such as `extended` expands), or the default set (the job checks the
    names)."""
    import losses

    return losses.resolve_loss_names([n.strip() for n in text.split(",")] if text else None)


def cmd_train(args: argparse.Namespace) -> int:
    """One run; under torchrun (`torchrun --nproc_per_node=N -m bench train ...`) one rank of it, rank 0
    opening the MLflow store and printing (`bench.train.distributed`)."""
    load_loss_modules(args)
    from bench.device import resolve_device
    from bench.report.console import metrics_table
    from bench.train import train_and_evaluate
    from bench.train.distributed import process_group
    from bench.train.run import starting_point

    exp = experiment_from_args(args)
    with process_group(resolve_device(args.device).type) as dist:
        # a damaged checkpoint or a change --resume cannot honour fails here, before any store is opened
        start = starting_point(exp, args.resume or False)
        main = dist is None or dist.is_main
        if dist is not None:
            dist.barrier()  # every rank knows where it starts before rank 0 writes a checkpoint
        tracker = make_tracker(args, exp) if main else None
        progress = main and not args.no_progress
        result = train_and_evaluate(
            exp, tracker, device=args.device, resume=start, progress=progress, dist=dist
        )
    if main:
        print(metrics_table({exp.loss.name: result.test_metrics}))
        print(
            f"MLflow run {result.run_id} in {tracker.experiment!r} ({_shown_uri(tracker.uri)}); "
            f"checkpoint {result.checkpoint}"
        )
    return 0


def refuse_torchrun(command: str) -> None:
    """`tune`, `run` and `ablate` train each of their runs in one process: under torchrun, say so."""
    from bench.config import ConfigError
    from bench.train.distributed import world_size_from_env

    if world_size_from_env() > 1:
        raise ConfigError(
            f"`{command}` does not run under torchrun (WORLD_SIZE={world_size_from_env()}): its runs train "
            "in one process each. Launch it without torchrun (several tune workers can share a study through "
            "--storage), or train a single run on several processes with `torchrun ... -m bench train`"
        )


def tune_job(args: argparse.Namespace, exp, storage: str, **settings):
    """The `TuneJob` of `tune` and `run`: the options both commands share, and the command's own
    `settings`."""
    from bench.tune import TuneJob

    return TuneJob(
        exp,
        _loss_list(args.losses),
        storage,
        device=args.device,
        timeout=args.timeout,
        workers=args.workers,
        loss_modules=args.loss_modules,
        widen=args.widen,
        **settings,
    )


def cmd_tune(args: argparse.Namespace) -> int:
    """The main job without the report (`bench.pipeline.tune`): prints the budgets and the final seeds'
    mean test metrics."""
    refuse_torchrun("tune")
    load_loss_modules(args)
    from bench.pipeline import mean_test_metrics, tune
    from bench.report.console import metrics_table

    for flag, key in (
        ("trials", "tune.trials"),
        ("storage", "tune.storage"),
        ("final_seeds", "tune.final_seeds"),
    ):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    exp = experiment_from_args(args)
    finals = not args.no_final and exp.tune.final_seeds != 0
    job = tune_job(args, exp, exp.tune.storage, study_name=args.study_name, finals=finals)
    result = tune(job, tracker=make_tracker(args, exp))
    if job.study_name:
        one = result.studies[job.losses[0]]
        print(
            f"study {one.study}: {one.complete} complete, {one.pruned} pruned, {one.failed} failed of "
            f"{one.budget}; best val MAP@R {one.best_value}"
        )
    else:
        print(result.budgets.to_string(index=False))
    if result.finals:
        rows = {name: mean_test_metrics(runs) for name, runs in result.finals.items()}
        print(f"mean over {exp.tune.final_seeds} final seeds:")
        print(metrics_table(rows))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: tune every loss on an equal budget, run the final seeds, write the report."""
    refuse_torchrun("run")
    load_loss_modules(args)
    from bench.pipeline import mean_test_metrics, run_main_job
    from bench.report.console import metrics_table

    exp = main_job_experiment(args)
    job = tune_job(args, exp, args.storage or exp.tune.storage)
    tracker = make_tracker(args, exp)
    print(
        f"[run] {exp.name}: {len(job.losses)} losses x {exp.tune.trials} trials of "
        f"{exp.tune.epochs or exp.train.epochs} epochs, then {exp.tune.final_seeds} final seeds of "
        f"{exp.tune.final_epochs or exp.train.epochs} epochs; "
        f"MLflow {_shown_uri(tracker.uri)} experiment {exp.tracking.experiment!r}"
    )
    result = run_main_job(job, tracker=tracker, report_dir=args.out)
    if not result.complete:
        return 1
    rows = {name: mean_test_metrics(finals) for name, finals in result.finals.items()}
    print(f"test metrics, mean over {exp.tune.final_seeds} final seed(s):")
    print(metrics_table(rows))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    refuse_torchrun("ablate")
    load_loss_modules(args)
    from bench.ablate import ablate, parse_values
    from bench.config import ConfigError

    exp = experiment_from_args(args)
    grid = {args.param: parse_values(args.values)}
    if args.param2:
        if not args.values2:
            raise ConfigError("--param2 needs --values2")
        grid[args.param2] = parse_values(args.values2)
    cells = ablate(exp, grid, tracker=make_tracker(args, exp), seeds=args.seeds, device=args.device)
    print(
        f"{len(cells)} runs ({sum(c.skipped for c in cells)} already finished) in "
        f"{exp.tracking.experiment!r}, tagged stage=ablation"
    )
    return 0


def _print_written(paths, out) -> None:
    print(f"{len(paths)} files written to {out}/:")
    for path in paths:
        print(f"  {path.name}")


def cmd_report(args: argparse.Namespace) -> int:
    load_loss_modules(args)
    from bench.report import make_report

    out = args.out or layout.report_dir(args.experiment)
    paths = make_report(
        args.tracking_uri,
        args.experiment,
        out,
        optuna_storage=args.optuna_storage,
        device=args.device,
        allow_unfair=args.allow_unfair,
    )
    for path in paths:  # each comparison table with its fairness receipt under it
        if path.name.startswith("comparison_") and path.suffix == ".md":
            print(path.read_text())
    _print_written(paths, out)
    return 0


def cmd_grad(args: argparse.Namespace) -> int:
    load_loss_modules(args)
    from bench.report import make_grad_report

    out = args.out or layout.grad_dir(args.experiment)
    _print_written(make_grad_report(args.tracking_uri, args.experiment, out, seed=args.seed), out)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Send the spooled records of runs that lost their tracking server; 1 while some are still kept."""
    from bench.tracking import SPOOL_DIR, redact, sync

    spool = args.spool or SPOOL_DIR
    result = sync(spool, args.tracking_uri)
    target = f" to {redact(args.tracking_uri)}" if args.tracking_uri else ""
    print(f"sent {result.records} records of {result.runs} runs from {spool}{target}")
    for path in result.busy:
        print(f"  {path}: its process is still running and sends it itself")
    for path in result.left:
        print(f"  {path}: its server still does not answer; run sync again later")
    return 1 if result.left else 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from bench.data.check import check_dataset

    root = args.root or f"datasets/{args.name}"
    report = check_dataset(args.name, root, decode=not args.no_decode)
    return 0 if report.ok else 1


def cmd_bench_loss(args: argparse.Namespace) -> int:
    from bench.benchmarks.loss_bench import LossSweep, format_table, run_loss_bench
    from bench.benchmarks.output import write_json
    from bench.device import resolve_device

    sweep = LossSweep(
        batch_sizes=args.batch_sizes,
        samples_per_class=args.samples_per_class,
        dim=args.dim,
        device=resolve_device(args.device).type,
        losses=tuple(args.losses.split(",")) if args.losses else None,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        threads=args.threads,
        max_bbb_gb=args.max_bbb_gb,
        timeout_s=600.0 if args.timeout is None else args.timeout,
    )
    table = run_loss_bench(sweep)
    print(format_table(table))
    write_json(args.json, table)
    return 0


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bench.benchmarks.eval_bench import SOP_TEST, format_table, run_eval_bench, run_memory_check
    from bench.benchmarks.output import time_limit, write_json

    data = replace(SOP_TEST, n=args.n, dim=args.dim, n_classes=args.classes)
    with time_limit(args.timeout):
        result = run_eval_bench(data, backend=args.backend)
        print(format_table(result))
        if args.memory_check:
            result["memory_check"] = run_memory_check(backend=args.backend)
            print(f"memory check (iNaturalist test size): {result['memory_check']}")
    write_json(args.json, result)
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    import tempfile

    from bench.benchmarks.data_bench import bench_data, synthetic_folder
    from bench.benchmarks.output import time_limit, write_json
    from bench.config import DataConfig, load_experiment

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            config = DataConfig(name="folder", root=str(synthetic_folder(tmp)), image_size=224, augment=True)
        else:
            config = load_experiment(args.dataset).data
        overrides = {"root": args.root, "num_workers": args.workers, "batch_size": args.batch_size}
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        with time_limit(args.timeout):
            result = bench_data(config, batches=args.batches)
    write_json(args.json, result)
    return 0


def cmd_bench_epochs(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from bench.benchmarks.epoch_bench import EpochCase, format_report, physical_limit, run_epoch_bench
    from bench.benchmarks.output import time_limit, write_json
    from bench.config import ConfigError

    trees = args.tree or [Path(__file__).resolve().parents[2]]
    missing = [str(tree) for tree in trees if not (tree / "bench" / "__main__.py").is_file()]
    if missing:
        raise ConfigError(
            f"--tree: not a smoothap-bench checkout (no bench/__main__.py): {', '.join(missing)}"
        )
    case = EpochCase(args.config, args.epochs, tuple(args.overrides))
    with time_limit(args.timeout):
        results = run_epoch_bench(trees, case, args.repeats, progress=lambda line: print(line, flush=True))
        limit = physical_limit(case, torch.get_num_threads())
    write_json(args.json, {"results": [vars(r) | {"tree": str(r.tree)} for r in results], "limit": limit})
    report = format_report(results, case, limit)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from bench.benchmarks.output import write_json
    from bench.benchmarks.train_bench import TrainSetup, TrainSweep, format_table, run_train_bench
    from bench.config import ConfigError
    from bench.device import resolve_device
    from bench.train.distributed import world_size_from_env

    if world_size_from_env() > 1:
        raise ConfigError(
            "`bench train` launches torchrun itself for each case: run it without torchrun, with --nproc N"
        )
    setup = TrainSetup(
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        samples_per_class=args.samples_per_class,
        loss=args.loss,
        embedding_dim=args.embedding_dim,
        freeze_bn=not args.train_bn,
        amp=args.precision == "bf16",
        device=resolve_device(args.device).type,
        steps=args.steps,
        warmup=args.warmup,
    )
    sweep = TrainSweep(
        processes=args.nproc,
        decodes=args.decode,
        modes=args.modes,
        chunk_size=args.chunk_size,
        jpeg_images=args.jpeg_images,
        jpeg_side=args.jpeg_side,
        threads=args.threads,
        workers=args.workers,
        timeout_s=1800.0 if args.timeout is None else args.timeout,
    )
    table = run_train_bench(setup, sweep)
    print(format_table(table))
    write_json(args.json, table)
    return 0


def cmd_bench_gpu_check(args: argparse.Namespace) -> int:
    from bench.benchmarks.gpu_check import run_gpu_check

    budget = args.timeout or args.budget
    return run_gpu_check(args.out, budget, args.machine, args.dry_run, args.json, only=args.only)
