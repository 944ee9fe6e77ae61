"""The `smoothap-bench` command line. Each subcommand is a small function over the library's plain calls.

Heavy imports (torch, mlflow, optuna) happen inside the commands so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

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
