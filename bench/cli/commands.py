"""The handlers behind `smoothap-bench`: each turns parsed arguments into one library call and prints.

Heavy imports (torch, MLflow, Optuna) happen inside the handlers, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse

from bench import layout


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
    import losses

    names = [n.strip() for n in text.split(",")] if text else losses.available_losses()
    for name in names:
        losses.get_spec(name)  # unknown names fail here with the list of known ones
    return names


def cmd_train(args: argparse.Namespace) -> int:
    from bench.report.console import metrics_table
    from bench.train import train_and_evaluate

    exp = experiment_from_args(args)
    tracker = make_tracker(args, exp)
    resume = args.resume if args.resume else False
    result = train_and_evaluate(
        exp, tracker, device=args.device, resume=resume, progress=not args.no_progress
    )
    print(metrics_table({exp.loss.name: result.test_metrics}))
    print(
        f"MLflow run {result.run_id} in {tracker.experiment!r} ({_shown_uri(tracker.uri)}); "
        f"checkpoint {result.checkpoint}"
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from bench.data import load_dataset
    from bench.pipeline import mean_test_metrics
    from bench.report.console import metrics_table
    from bench.tune import budget_report, run_finals, tune_losses

    for flag, key in (
        ("trials", "tune.trials"),
        ("storage", "tune.storage"),
        ("final_seeds", "tune.final_seeds"),
    ):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    exp = experiment_from_args(args)
    names = _loss_list(args.losses)
    tracker = make_tracker(args, exp)
    bundle = load_dataset(exp.data)
    studies = tune_losses(
        exp,
        names,
        tracker=tracker,
        storage=exp.tune.storage,
        study_name_override=args.study_name,
        timeout=args.timeout,
        device=args.device,
        bundle=bundle,
    )
    if args.study_name:
        one = studies[names[0]]
        print(
            f"study {one.study}: {one.complete} complete, {one.pruned} pruned, {one.failed} failed of "
            f"{one.budget}; best val MAP@R {one.best_value}"
        )
    else:
        print(budget_report(exp.tune.storage, exp.name, names).to_string(index=False))
    if args.no_final or exp.tune.final_seeds == 0 or not all(s.done for s in studies.values()):
        return 0
    rows = {
        name: mean_test_metrics(
            run_finals(
                exp,
                name,
                tracker=tracker,
                storage=exp.tune.storage,
                device=args.device,
                bundle=bundle,
                study=args.study_name,
            )
        )
        for name in names
    }
    print(f"mean over {exp.tune.final_seeds} final seeds:")
    print(metrics_table(rows))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: tune every loss on an equal budget, run the final seeds, write the report."""
    from bench.pipeline import mean_test_metrics, run_main_job
    from bench.report.console import metrics_table

    exp = main_job_experiment(args)
    names = _loss_list(args.losses)
    tracker = make_tracker(args, exp)
    print(
        f"[run] {exp.name}: {len(names)} losses x {exp.tune.trials} trials of {exp.tune.epochs or exp.train.epochs} "
        f"epochs, then {exp.tune.final_seeds} final seeds of {exp.tune.final_epochs or exp.train.epochs} epochs; "
        f"MLflow {_shown_uri(tracker.uri)} experiment {exp.tracking.experiment!r}"
    )
    result = run_main_job(
        exp,
        names,
        tracker=tracker,
        storage=args.storage or exp.tune.storage,
        device=args.device,
        timeout=args.timeout,
        report_dir=args.out,
    )
    if not result.complete:
        return 1
    rows = {name: mean_test_metrics(finals) for name, finals in result.finals.items()}
    print(f"test metrics, mean over {exp.tune.final_seeds} final seed(s):")
    print(metrics_table(rows))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
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
    from bench.report import make_report

    out = args.out or layout.report_dir(args.experiment)
    paths = make_report(
        args.tracking_uri, args.experiment, out, optuna_storage=args.optuna_storage, device=args.device
    )
    _print_written(paths, out)
    return 0


def cmd_grad(args: argparse.Namespace) -> int:
    from bench.report import make_grad_report

    out = args.out or layout.grad_dir(args.experiment)
    _print_written(make_grad_report(args.tracking_uri, args.experiment, out, seed=args.seed), out)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from bench.data.check import check_dataset

    root = args.root or f"datasets/{args.name}"
    report = check_dataset(args.name, root, decode=not args.no_decode)
    return 0 if report.ok else 1


def cmd_bench_loss(args: argparse.Namespace) -> int:
    from bench.benchmarks.loss_bench import format_table, run_loss_bench
    from bench.device import resolve_device

    table = run_loss_bench(
        batch_sizes=args.batch_sizes,
        samples_per_class=args.samples_per_class,
        dim=args.dim,
        device=resolve_device(args.device).type,
        losses=args.losses.split(",") if args.losses else None,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        threads=args.threads,
        max_bbb_gb=args.max_bbb_gb,
    )
    print(format_table(table))
    return 0


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from bench.benchmarks.eval_bench import format_table, run_eval_bench, run_memory_check

    print(format_table(run_eval_bench(n=args.n, dim=args.dim, n_classes=args.classes, backend=args.backend)))
    if args.memory_check:
        check = run_memory_check(backend=args.backend)
        print(f"memory check (iNaturalist test size): {check}")
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    import tempfile

    from bench.benchmarks.data_bench import bench_data, synthetic_folder
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
        bench_data(config, batches=args.batches)
    return 0
