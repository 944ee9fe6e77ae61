"""The `smoothap-bench` command line. Each subcommand is a small function over the library's plain calls.

Heavy imports (torch, mlflow, optuna) happen inside the commands so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

Handler = Callable[[argparse.Namespace], int]

EPILOG = """examples:
  smoothap-bench run                                  # the main job on the bundled Omniglot data
  smoothap-bench train --config omniglot --loss smooth_ap --set optim.lr=3e-4
  smoothap-bench train --config omniglot --loss smooth_ap --resume   # continue an interrupted run
  smoothap-bench bench loss                           # Smooth-AP speed and memory against the B x B x B algorithm
"""


def add_experiment_options(parser: argparse.ArgumentParser, loss: bool = True) -> None:
    """Options shared by every command that trains: config, overrides, seed, device, tracking."""
    parser.add_argument("--config", default="omniglot",
                        help="bundled config name (see bench/configs/) or path to a YAML file (default: omniglot)")
    if loss:
        parser.add_argument("--loss", help="registry name of the loss (default: the config's loss.name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable; values parsed as YAML)")
    parser.add_argument("--seed", type=int, help="training seed (default: the config's train.seed)")
    parser.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    add_runtime_options(parser)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train and evaluate (default: auto = cuda when available)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db); "
                             "put a server's password in MLFLOW_TRACKING_PASSWORD, not in the URI")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


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


def make_tracker(args: argparse.Namespace, exp):
    """The MLflow store: --tracking-uri, else MLFLOW_TRACKING_URI, else the config's tracking.uri."""
    from bench.tracking import Tracker

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or exp.tracking.uri
    return Tracker(uri, exp.tracking.experiment, exp.tracking.artifact_location)


def cmd_train(args: argparse.Namespace) -> int:
    from bench.report.console import metrics_table
    from bench.train import train_and_evaluate

    exp = experiment_from_args(args)
    tracker = make_tracker(args, exp)
    resume = args.resume if args.resume else False
    result = train_and_evaluate(exp, tracker, device=args.device, resume=resume, progress=not args.no_progress)
    print(metrics_table({exp.loss.name: result.test_metrics}))
    print(f"MLflow run {result.run_id} in {tracker.experiment!r} ({_shown_uri(tracker.uri)}); "
          f"checkpoint {result.checkpoint}")
    return 0


def _tune_experiment(args: argparse.Namespace):
    """The config with the tuning shortcuts applied (--trials, --storage, --final-seeds)."""
    for flag, key in (("trials", "tune.trials"), ("storage", "tune.storage"), ("final_seeds", "tune.final_seeds")):
        if getattr(args, flag, None) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    return experiment_from_args(args)


def _loss_list(text: str | None) -> list[str]:
    import losses

    names = [n.strip() for n in text.split(",")] if text else losses.available_losses()
    for name in names:
        losses.get_spec(name)  # unknown names fail here with the list of known ones
    return names


def mean_test_metrics(finals) -> dict[str, float]:
    """Each test metric's mean over a loss's final-seed runs (the metrics every run has)."""
    keys = set.intersection(*(set(f.test_metrics) for f in finals))
    return {k: sum(f.test_metrics[k] for f in finals) / len(finals) for k in keys}


def cmd_tune(args: argparse.Namespace) -> int:
    from bench.data import load_dataset
    from bench.report.console import metrics_table
    from bench.tune import budget_report, run_finals, tune_losses

    exp = _tune_experiment(args)
    names = _loss_list(args.losses)
    tracker = make_tracker(args, exp)
    bundle = load_dataset(exp.data)
    studies = tune_losses(exp, names, tracker=tracker, storage=exp.tune.storage, study_name_override=args.study_name,
                          timeout=args.timeout, device=args.device, bundle=bundle)
    if args.study_name:
        one = studies[names[0]]
        print(f"study {one.study}: {one.complete} complete, {one.pruned} pruned, {one.failed} failed of "
              f"{one.budget}; best val MAP@R {one.best_value}")
    else:
        print(budget_report(exp.tune.storage, exp.name, names).to_string(index=False))
    if args.no_final or exp.tune.final_seeds == 0 or not all(s.done for s in studies.values()):
        return 0
    rows = {name: mean_test_metrics(run_finals(exp, name, tracker=tracker, storage=exp.tune.storage,
                                               device=args.device, bundle=bundle, study=args.study_name))
            for name in names}
    print(f"mean over {exp.tune.final_seeds} final seeds:")
    print(metrics_table(rows))
    return 0


QUICK = ["tune.trials=2", "tune.epochs=1", "tune.final_epochs=1", "tune.final_seeds=1"]


def run_overrides(args: argparse.Namespace) -> list[str]:
    """--quick's budget and --experiment-name (the experiment's name, MLflow experiment and study prefix) as
    config overrides, before the user's own --set ones so that those still win."""
    name = args.experiment_name or ("omniglot-quick" if args.quick else None)
    renamed = [f"name={name}", f"tracking.experiment={name}"] if name else []
    return (QUICK if args.quick else []) + renamed + args.overrides


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: tune every loss on an equal budget, run the final seeds, write the report."""
    from bench.tune import run_main_job

    args.overrides = run_overrides(args)
    exp = experiment_from_args(args)
    names = _loss_list(args.losses)
    tracker = make_tracker(args, exp)
    print(f"[run] {exp.name}: {len(names)} losses x {exp.tune.trials} trials of {exp.tune.epochs or exp.train.epochs} "
          f"epochs, then {exp.tune.final_seeds} final seeds of {exp.tune.final_epochs or exp.train.epochs} epochs; "
          f"MLflow {_shown_uri(tracker.uri)} experiment {exp.tracking.experiment!r}")
    result = run_main_job(exp, names, tracker=tracker, storage=args.storage or exp.tune.storage, device=args.device,
                          timeout=args.timeout, report_dir=args.out)
    if not result.complete:
        return 1
    from bench.report import make_grad_report
    from bench.report.console import metrics_table

    grad_dir = Path(args.out or f"results/{exp.tracking.experiment}") / "grad"
    grad_files = make_grad_report(tracker.uri, exp.tracking.experiment, grad_dir)
    print(f"[run] gradient analysis: {len(grad_files)} files in {grad_dir}/")

    rows = {name: mean_test_metrics(finals) for name, finals in result.finals.items()}
    print(f"test metrics, mean over {exp.tune.final_seeds} final seed(s):")
    print(metrics_table(rows))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from bench.ablate import ablate, parse_values

    exp = experiment_from_args(args)
    grid = {args.param: parse_values(args.values)}
    if args.param2:
        if not args.values2:
            raise ValueError("--param2 needs --values2")
        grid[args.param2] = parse_values(args.values2)
    cells = ablate(exp, grid, tracker=make_tracker(args, exp), seeds=args.seeds, device=args.device)
    print(f"{len(cells)} runs ({sum(c.skipped for c in cells)} already finished) in "
          f"{exp.tracking.experiment!r}, tagged stage=ablation")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import make_report

    out = args.out or f"results/{args.experiment}"
    paths = make_report(args.tracking_uri, args.experiment, out, optuna_storage=args.optuna_storage,
                        device=args.device)
    print(f"{len(paths)} files written to {out}/:")
    for path in paths:
        print(f"  {path.name}")
    return 0


def cmd_grad(args: argparse.Namespace) -> int:
    from bench.report import make_grad_report

    out = args.out or f"results/{args.experiment}/grad"
    paths = make_grad_report(args.tracking_uri, args.experiment, out, seed=args.seed)
    print(f"{len(paths)} files written to {out}/:")
    for path in paths:
        print(f"  {path.name}")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_data_check(args: argparse.Namespace) -> int:
    from bench.data.check import check_dataset

    root = args.root or f"datasets/{args.name}"
    report = check_dataset(args.name, root, decode=not args.no_decode)
    return 0 if report.ok else 1


def cmd_bench_loss(args: argparse.Namespace) -> int:
    from bench.benchmarks.loss_bench import format_table, run_loss_bench

    device = "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
    table = run_loss_bench(batch_sizes=args.batch_sizes, samples_per_class=args.samples_per_class, dim=args.dim,
                           device=device, losses=args.losses.split(",") if args.losses else None,
                           repeats=args.repeats, min_seconds=args.min_seconds, threads=args.threads,
                           max_bbb_gb=args.max_bbb_gb)
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """Where a report reads from: the MLflow store and the experiment's name in it."""
    parser.add_argument("--experiment", default="omniglot",
                        help="MLflow experiment to report on (the config's tracking.experiment; default: omniglot)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db)")


def _shown_uri(uri: str) -> str:
    from bench.tracking import redact

    return redact(uri)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothap-bench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train, tune and compare deep metric learning losses (Smooth-AP and baselines) on identical "
                    "backbones, logged to MLflow.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train and evaluate one loss, print its test metrics",
                                description="Train one run: config + loss + seed -> checkpoint, MLflow run, test metrics.")
    add_experiment_options(train)
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                       help="continue an interrupted run from its last checkpoint (default path: "
                            "<train.checkpoint_dir>/<experiment>/<loss>-seed<seed>/last.pt)")
    train.set_defaults(handler=cmd_train)

    run = commands.add_parser(
        "run", help="the main job: tune all losses on equal budgets, final seeds, report (Omniglot by default)",
        description="Tune every loss (Optuna, equal budget, validation classes only), retrain each loss's best "
                    "parameters with several seeds, test once, and write tables and figures to results/<experiment>/. "
                    "Budgets come from the config's tune section; re-running continues where it stopped.")
    add_experiment_options(run, loss=False)
    run.add_argument("--quick", action="store_true",
                     help="a smoke-sized comparison in a few minutes: " + " ".join(QUICK) + " (experiment omniglot-quick)")
    run.add_argument("--experiment-name", help="name of the experiment, its MLflow experiment and its studies (default: the config's; with --quick: omniglot-quick)")
    run.add_argument("--losses", help="comma-separated registry names (default: every registered loss)")
    run.add_argument("--storage", help="Optuna storage URL (default: the config's tune.storage)")
    run.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    run.add_argument("--out", help="report folder (default: results/<experiment>/)")
    run.set_defaults(handler=cmd_run)

    tune = commands.add_parser("tune", help="Optuna study per loss on an equal budget, then final seeds",
                               description="One study <experiment>-<loss> per loss (TPE, seeded; pruning on "
                                           "validation MAP@R), each to the same number of finished trials; then "
                                           "each loss's best setting retrained with S seeds and tested once. "
                                           "Re-run the same command to continue; start it several times to add "
                                           "workers (pass --no-final to all but one).")
    add_experiment_options(tune, loss=False)
    tune.add_argument("--losses", help="comma-separated registry names (default: every registered loss)")
    tune.add_argument("--trials", type=int, help="finished trials per loss (default: the config's tune.trials)")
    tune.add_argument("--timeout", type=float, metavar="S",
                      help="start no new trial after S seconds (losses take turns, so budgets stay level)")
    tune.add_argument("--storage", help="Optuna RDB URL (default: the config's tune.storage, "
                                        "sqlite:///results/optuna.db; PostgreSQL for workers on several machines)")
    tune.add_argument("--study-name", help="study name for a single loss (default: <experiment>-<loss>)")
    tune.add_argument("--final-seeds", type=int, help="final seeds per loss (default: the config's tune.final_seeds)")
    tune.add_argument("--no-final", action="store_true", help="tune only; skip the final seed runs")
    tune.set_defaults(handler=cmd_tune)

    ablation = commands.add_parser("ablate", help="grid over one or two parameters x seeds, everything else fixed",
                                   description="Train every value (pair) of the swept parameter(s) with each seed; "
                                               "runs tagged stage=ablation. Finished cells are skipped on re-run.")
    add_experiment_options(ablation)
    ablation.add_argument("--param", required=True,
                          help="config key to sweep, e.g. loss.temperature (= loss.params.temperature), "
                               "data.batch_size, data.samples_per_class, model.embedding_dim")
    ablation.add_argument("--values", required=True, help="comma-separated values, e.g. 0.001,0.01,0.1,1")
    ablation.add_argument("--param2", help="second swept key (a 2-D grid)")
    ablation.add_argument("--values2", help="values of --param2")
    ablation.add_argument("--seeds", type=int, default=3, help="seeds per cell: train.seed, +1, ... (default: 3)")
    ablation.set_defaults(handler=cmd_ablate)

    report = commands.add_parser("report", help="comparison tables and figures from the MLflow and Optuna stores",
                                 description="Read the final, tuning and ablation runs of an experiment and write "
                                             "tables (Markdown, LaTeX, CSV) and figures (PNG, PDF).")
    add_report_options(report)
    report.add_argument("--out", help="output folder (default: results/<experiment>/)")
    report.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the checkpoint behind the retrieval examples embeds the test split (default: cpu)")
    report.add_argument("--optuna-storage", default="sqlite:///results/optuna.db",
                        help="Optuna storage holding the studies <experiment>-<loss> (default: sqlite:///results/optuna.db)")
    report.set_defaults(handler=cmd_report)

    grad = commands.add_parser("grad", help="gradient analysis: sigmoid vs step, |dL/ds| by rank, gradient norms",
                               description="The paper's figure 2, where each loss spends its gradient along the "
                                           "ranking (initial and trained model), and the embedding-gradient norm "
                                           "over training; each figure with its data as CSV.")
    add_report_options(grad)
    grad.add_argument("--out", help="output folder (default: results/<experiment>/grad/)")
    grad.add_argument("--seed", type=int, default=0, help="seed that draws the analysed batch (default: 0)")
    grad.set_defaults(handler=cmd_grad)

    data = commands.add_parser("data", help="dataset tools: check a dataset on disk")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_commands.add_parser("check", help="print classes and images per split, and every problem found",
                                     description="Read a dataset's official files, compare with the published counts "
                                                 "and decode every image. Exit 1 when problems are found.")
    check.add_argument("name", help="dataset name (omniglot, sop, cub200, cars196, inshop, vehicleid, inaturalist, "
                                    "vggface2, folder)")
    check.add_argument("--root", help="dataset folder (default: datasets/<name>)")
    check.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    check.set_defaults(handler=cmd_data_check)

    bench = commands.add_parser("bench", help="speed and memory benchmarks, measured side by side in one run")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    loss = bench_commands.add_parser(
        "loss", help="forward+backward time and peak memory of every loss, ratios to our Smooth-AP",
        description="For each batch size (4 samples per class, D=512): our Smooth-AP, the released code's "
                    "B x B x B algorithm (where it fits), pytorch-metric-learning's SmoothAPLoss and the other "
                    "losses, each case in its own process.")
    loss.add_argument("--batch-sizes", type=_int_list, default=(224, 384, 1024, 4096, 8192),
                      help="comma-separated batch sizes (default: 224,384,1024,4096,8192)")
    loss.add_argument("--samples-per-class", type=int, default=4)
    loss.add_argument("--dim", type=int, default=512, help="embedding size (default: 512)")
    loss.add_argument("--losses", help="comma-separated subset: registry names, smooth_ap_bbb (released B x B x B algorithm), smooth_ap_pml (default: all)")
    loss.add_argument("--repeats", type=int, default=3,
                      help="at least this many timed passes per case; the fastest counts (default: 3)")
    loss.add_argument("--min-seconds", type=float, default=1.0,
                      help="keep timing a case until its passes add up to this many seconds, as timeit does, "
                           "so fast cases get enough passes to find an undisturbed one (default: 1)")
    loss.add_argument("--threads", type=int, help="torch threads per case (default: torch's own)")
    loss.add_argument("--max-bbb-gb", type=float, default=4.0,
                      help="skip the B x B x B algorithm where it would need more memory (default: 4)")
    loss.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    loss.set_defaults(handler=cmd_bench_loss)
    evaluation = bench_commands.add_parser(
        "eval", help="our retrieval metrics against pytorch-metric-learning's AccuracyCalculator",
        description="Random normalised embeddings of the SOP test size, evaluated by both in one run: "
                    "time, speed ratio and agreement of precision@1, MAP@R and R-precision.")
    evaluation.add_argument("--n", type=int, default=60502, help="embeddings (default: 60,502, SOP's test set)")
    evaluation.add_argument("--classes", type=int, default=11316, help="classes (default: 11,316)")
    evaluation.add_argument("--dim", type=int, default=512)
    evaluation.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    evaluation.add_argument("--memory-check", action="store_true",
                            help="also evaluate 136,093 x 512 (iNaturalist's test size) and report peak memory")
    evaluation.set_defaults(handler=cmd_bench_eval)
    data_bench = bench_commands.add_parser("data", help="images/s of a dataset's loading pipeline",
                                           description="Decode, transform and batch images as training does.")
    source = data_bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="bundled config name whose data section to use (e.g. sop)")
    source.add_argument("--synthetic", action="store_true", help="a generated folder of JPEGs, no download needed")
    data_bench.add_argument("--root", help="dataset folder (default: the config's data.root)")
    data_bench.add_argument("--workers", type=int, help="DataLoader workers (default: the config's)")
    data_bench.add_argument("--batch-size", type=int, help="images per batch (default: the config's)")
    data_bench.add_argument("--batches", type=int, default=20, help="batches to time (default: 20)")
    data_bench.set_defaults(handler=cmd_bench_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bench.config import ConfigError
    from bench.data import DatasetError
    from bench.train import NonFiniteLossError

    try:
        return args.handler(args)
    except (ConfigError, DatasetError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
