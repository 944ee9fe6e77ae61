"""The `smoothap-bench` command line (also `python -m bench`): the parser in `parser`, handlers in
`commands`."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from bench.cli.parser import build_parser  # noqa: E402

RERUN_HINT = "run the same command again to continue where it stopped"
ON_INTERRUPT = {"tune": RERUN_HINT, "run": RERUN_HINT, "ablate": RERUN_HINT}


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected errors print one line and exit 2 (1 for a diverged loss), Ctrl-C one line
    and 130, no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return _handle(args)
    except KeyboardInterrupt as interrupt:
        hint = ON_INTERRUPT.get(args.command) or str(interrupt)  # train's names its checkpoint
        print("interrupted" + (f": {hint}" if hint else ""), file=sys.stderr)
        return 130


def _handle(args) -> int:
    """The command's handler, with its expected errors turned into one line and an exit code."""
    from bench.config import ConfigError
    from bench.data import DatasetError
    from bench.train import NonFiniteLossError
    from bench.train.checkpoint import CheckpointError

    try:
        return args.handler(args)
    except (
        ConfigError,
        CheckpointError,
        DatasetError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BaseException as error:  # StorageLost is one; KeyboardInterrupt passes through to main
        if _storage_lost(error):  # the Optuna database stayed away past the retries
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise


def _storage_lost(error: BaseException) -> bool:
    """Whether `error` is tuning's StorageLost; only a command that tunes has imported it (with Optuna, which
    the other commands need not load)."""
    study = sys.modules.get("bench.tune.study")
    return study is not None and isinstance(error, study.StorageLost)


__all__ = ["build_parser", "main"]
