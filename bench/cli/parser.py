"""The `smoothap-bench` argument parser: every command, its options and its help, and nothing else.

Handlers live in `bench.cli.commands`; the parser only names them, so `--help` answers without importing
torch, MLflow or Optuna.
"""

from __future__ import annotations

import argparse

from bench import layout
from bench.cli import commands as handlers
from bench.cli.bench_parser import (
    add_data_bench,
    add_epoch_bench,
    add_eval_bench,
    add_gpu_check,
    add_loss_bench,
    add_train_bench,
)
from bench.device import DEVICE_CHOICES
from bench.pipeline import QUICK_EXPERIMENT, QUICK_OVERRIDES

EPILOG = """examples:
  smoothap-bench run                                  # the main job on the bundled Omniglot data
  smoothap-bench train --config omniglot --loss smooth_ap --set optim.lr=3e-4
  smoothap-bench train --config omniglot --loss smooth_ap --resume   # continue an interrupted run
  smoothap-bench bench loss                           # Smooth-AP speed and memory against the \
B x B x B algorithm
"""
WIDEN_HELP = (
    "after tuning, retune each loss whose best value lies at an edge of its range (within 5%%, log scale for "
    "log-scaled parameters) over that range widened by FACTOR on the side it hit, on the same budget, "
    "in the study <experiment>-<loss>-widened; its final runs come from there (try 10)"
)
LOSSES_HELP = (
    "comma-separated registry names, or a named set: 'extended' is the six design losses and the later ones "
    "(roadmap, recall_at_k, pnp) (default: every registered loss but the later ones)"
)
TRACKING_HELP = f"MLflow tracking URI (default: MLFLOW_TRACKING_URI, else {layout.MLFLOW_URI})"


def add_experiment_options(parser: argparse.ArgumentParser, loss: bool = True) -> None:
    """Options shared by every command that trains: config, overrides, seed, device, tracking."""
    parser.add_argument(
        "--config",
        default="omniglot",
        help="bundled config name (see bench/configs/) or path to a YAML file (default: omniglot)",
    )
    if loss:
        parser.add_argument("--loss", help="registry name of the loss (default: the config's loss.name)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable; values parsed as YAML)",
    )
    parser.add_argument("--seed", type=int, help="training seed (default: the config's train.seed)")
    parser.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    add_loss_module_option(parser)
    add_runtime_options(parser)


def add_loss_module_option(parser: argparse.ArgumentParser) -> None:
    """`--loss-module FILE`: losses from outside the package, on every command that builds or names one."""
    parser.add_argument(
        "--loss-module",
        dest="loss_modules",
        action="append",
        default=[],
        metavar="FILE",
        help="a Python file, anywhere, that registers a loss with losses.register(...); its losses join "
        "the registry before anything else runs (repeatable)",
    )


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="where to train and evaluate (default: auto = cuda when available)",
    )
    parser.add_argument(
        "--tracking-uri",
        help=f"{TRACKING_HELP}; put a server's password in MLFLOW_TRACKING_PASSWORD, not in the URI",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """Where a report reads from: the MLflow store and the experiment's name in it."""
    parser.add_argument(
        "--experiment",
        default="omniglot",
        help="MLflow experiment to report on (the config's tracking.experiment; default: omniglot)",
    )
    parser.add_argument("--tracking-uri", help=TRACKING_HELP)
    add_loss_module_option(parser)


WORKERS_HELP = (
    "tuning processes on this machine: one per GPU (CUDA_VISIBLE_DEVICES pinned), else CPU workers with the "
    "cores split between them; the same command on other machines with the same PostgreSQL --storage joins "
    "the same studies (default: 1)"
)


def _worker_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers, at least 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, one `add_<command>` per command."""
    parser = argparse.ArgumentParser(
        prog="smoothap-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Train, tune and compare deep metric learning losses (Smooth-AP and baselines) "
        "on identical backbones, logged to MLflow.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train(commands)
    add_run(commands)
    add_tune(commands)
    add_ablate(commands)
    add_report(commands)
    add_grad(commands)
    add_sync(commands)
    add_data(commands)
    add_bench(commands)
    return parser


def add_train(commands) -> None:
    """`train`: one run of one loss."""
    train = commands.add_parser(
        "train",
        help="train and evaluate one loss, print its test metrics",
        description="Train one run: config + loss + seed -> checkpoint, MLflow run, test metrics.",
    )
    add_experiment_options(train)
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run from its last checkpoint (default path: "
        "<train.checkpoint_dir>/<experiment>/<loss>-seed<seed>/last.pt)",
    )
    train.set_defaults(handler=handlers.cmd_train)


def add_run(commands) -> None:
    """`run`: the main job."""
    run = commands.add_parser(
        "run",
        help="the main job: tune all losses on equal budgets, final seeds, report (Omniglot by default)",
        description="Tune every loss (Optuna, equal budget, validation classes only), "
        "retrain each loss's best parameters with several seeds, test once, and write tables and figures "
        "to results/<experiment>/. Budgets come from the config's tune section; re-running continues "
        "where it stopped.",
    )
    add_experiment_options(run, loss=False)
    run.add_argument(
        "--quick",
        action="store_true",
        help="a smoke-sized comparison in a few minutes: "
        + " ".join(QUICK_OVERRIDES)
        + f" (experiment {QUICK_EXPERIMENT})",
    )
    run.add_argument(
        "--experiment-name",
        help="name of the experiment, its MLflow experiment and its studies "
        "(default: the config's; with --quick: omniglot-quick)",
    )
    run.add_argument("--losses", help=LOSSES_HELP)
    run.add_argument("--storage", help="Optuna storage URL (default: the config's tune.storage)")
    run.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    run.add_argument("--workers", type=_worker_count, default=1, metavar="N", help=WORKERS_HELP)
    run.add_argument("--widen", type=float, metavar="FACTOR", help=WIDEN_HELP)
    run.add_argument("--out", help="report folder (default: results/<experiment>/)")
    run.set_defaults(handler=handlers.cmd_run)


def add_tune(commands) -> None:
    """`tune`: a study per loss on an equal budget, then final seeds."""
    tune = commands.add_parser(
        "tune",
        help="Optuna study per loss on an equal budget, then final seeds",
        description="One study <experiment>-<loss> per loss (TPE, seeded; pruning on "
        "validation MAP@R), each to the same number of finished trials; then "
        "each loss's best setting retrained with S seeds and tested once. "
        "Re-run the same command to continue; start it several times to add "
        "workers (pass --no-final to all but one).",
    )
    add_experiment_options(tune, loss=False)
    tune.add_argument("--losses", help=LOSSES_HELP)
    tune.add_argument(
        "--trials", type=int, help="finished trials per loss (default: the config's tune.trials)"
    )
    tune.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="start no new trial after S seconds (losses take turns, so budgets stay level)",
    )
    tune.add_argument(
        "--storage",
        help="Optuna RDB URL (default: the config's tune.storage, "
        f"{layout.OPTUNA_STORAGE}; PostgreSQL for workers on several machines)",
    )
    tune.add_argument("--workers", type=_worker_count, default=1, metavar="N", help=WORKERS_HELP)
    tune.add_argument("--study-name", help="study name for a single loss (default: <experiment>-<loss>)")
    tune.add_argument(
        "--final-seeds", type=int, help="final seeds per loss (default: the config's tune.final_seeds)"
    )
    tune.add_argument("--no-final", action="store_true", help="tune only; skip the final seed runs")
    tune.add_argument("--widen", type=float, metavar="FACTOR", help=WIDEN_HELP)
    tune.set_defaults(handler=handlers.cmd_tune)


def add_ablate(commands) -> None:
    """`ablate`: a grid over one or two parameters x seeds."""
    ablation = commands.add_parser(
        "ablate",
        help="grid over one or two parameters x seeds, everything else fixed",
        description="Train every value (pair) of the swept parameter(s) with each seed; "
        "runs tagged stage=ablation. Finished cells are skipped on re-run.",
    )
    add_experiment_options(ablation)
    ablation.add_argument(
        "--param",
        required=True,
        help="config key to sweep, e.g. loss.temperature (= loss.params.temperature), "
        "data.batch_size, data.samples_per_class, model.embedding_dim",
    )
    ablation.add_argument("--values", required=True, help="comma-separated values, e.g. 0.001,0.01,0.1,1")
    ablation.add_argument("--param2", help="second swept key (a 2-D grid)")
    ablation.add_argument("--values2", help="values of --param2")
    ablation.add_argument(
        "--seeds", type=int, default=3, help="seeds per cell: train.seed, +1, ... (default: 3)"
    )
    ablation.set_defaults(handler=handlers.cmd_ablate)


def add_report(commands) -> None:
    """`report`: tables and figures from the stores."""
    report = commands.add_parser(
        "report",
        help="comparison tables and figures from the MLflow and Optuna stores",
        description="Read the final, tuning and ablation runs of an experiment and write "
        "tables (Markdown, LaTeX, CSV) and figures (PNG, PDF).",
    )
    add_report_options(report)
    report.add_argument("--out", help="output folder (default: results/<experiment>/)")
    report.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the checkpoint behind the retrieval examples embeds the test split (default: cpu)",
    )
    report.add_argument(
        "--optuna-storage",
        default=layout.OPTUNA_STORAGE,
        help=f"Optuna storage holding the studies <experiment>-<loss> (default: {layout.OPTUNA_STORAGE})",
    )
    report.add_argument(
        "--allow-unfair",
        action="store_true",
        help="render a comparison whose fairness receipt is broken (losses at one seed with other initial "
        "weights or batches, or a tuning run that evaluated a test split); its tables are marked unfair",
    )
    report.set_defaults(handler=handlers.cmd_report)


def add_grad(commands) -> None:
    """`grad`: the gradient analysis."""
    grad = commands.add_parser(
        "grad",
        help="gradient analysis: sigmoid vs step, |dL/ds| by rank, gradient norms",
        description="The paper's figure 2, where each loss spends its gradient along the "
        "ranking (initial and trained model), and the embedding-gradient norm "
        "over training; each figure with its data as CSV.",
    )
    add_report_options(grad)
    grad.add_argument("--out", help="output folder (default: results/<experiment>/grad/)")
    grad.add_argument("--seed", type=int, default=0, help="seed that draws the analysed batch (default: 0)")
    grad.set_defaults(handler=handlers.cmd_grad)


def add_sync(commands) -> None:
    """`sync`: upload what runs spooled during a tracking-server outage."""
    sync = commands.add_parser(
        "sync",
        help="send what runs kept while the MLflow server was unreachable",
        description="Runs that could not reach their tracking server keep what they log in a spool folder. "
        "Send it, in order, to the server (each file names the server it was meant for); what a server "
        "still does not take stays for the next sync.",
    )
    sync.add_argument("--spool", help=f"the spool folder (default: {layout.RESULTS}/spool)", metavar="FOLDER")
    sync.add_argument(
        "--tracking-uri",
        help="send to this server instead of the one each file names (needed when that URL had a password)",
    )
    sync.set_defaults(handler=handlers.cmd_sync)


def add_data(commands) -> None:
    """`data check`: a dataset on disk against its published counts."""
    data = commands.add_parser("data", help="dataset tools: check a dataset on disk")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_commands.add_parser(
        "check",
        help="print classes and images per split, and every problem found",
        description="Read a dataset's official files, compare with the published counts "
        "and decode every image. Exit 1 when problems are found.",
    )
    check.add_argument(
        "name",
        help="dataset name (omniglot, sop, cub200, cars196, inshop, vehicleid, inaturalist, "
        "vggface2, folder)",
    )
    check.add_argument("--root", help="dataset folder (default: datasets/<name>)")
    check.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    check.set_defaults(handler=handlers.cmd_data_check)


def add_bench(commands) -> None:
    """`bench ...`: speed and memory benchmarks (bench/cli/bench_parser.py)."""
    bench = commands.add_parser("bench", help="speed and memory benchmarks, measured side by side in one run")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    add_loss_bench(bench_commands)
    add_eval_bench(bench_commands)
    add_data_bench(bench_commands)
    add_train_bench(bench_commands)
    add_epoch_bench(bench_commands)
    add_gpu_check(bench_commands)
