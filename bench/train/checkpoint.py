"""Checkpoints: one `last.pt` per run, written atomically after every epoch, read with `weights_only=True`.

A file that cannot serve as a checkpoint (truncated, empty, another tool's pickle, another format version)
raises `CheckpointError`: one line naming the file, what is wrong and how to go on, never a raw unpickling
traceback, and nothing is written.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from bench import layout
from bench.config import Experiment, experiment_from_dict
from bench.models import build_model

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("epoch", "model", "optimizer", "scheduler", "loss", "config", "history", "in_channels")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it, says what is wrong and how to go on."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(
            f"checkpoint {path} {problem}; move it aside (mv {path} {path}.bad) to start this run afresh, "
            f"or continue from another checkpoint with `train --resume PATH`"
        )


def default_checkpoint_path(exp: Experiment) -> Path:
    return layout.run_checkpoint(exp.train.checkpoint_dir, exp.name, exp.loss.name, exp.train.seed)


def load_checkpoint(path: str | Path) -> dict:
    """The state saved at `path`, checked to be a whole checkpoint of this format (else CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is an empty file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises whatever its zip reader or unpickler met
        raise CheckpointError(path, _unreadable(error)) from error
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(
            path, f"holds a {type(state).__name__} without a format: not a smoothap-bench file"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            path, f"has format {state['format']!r}; this version of smoothap-bench reads {CHECKPOINT_FORMAT}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(path, f"lacks {', '.join(missing)}: not a whole checkpoint")
    return state


def _unreadable(error: Exception) -> str:
    """What went wrong reading a file with torch.load, in a few words (its own messages run to paragraphs)."""
    if isinstance(error, pickle.UnpicklingError):
        return "holds pickled objects no checkpoint contains (another tool's file?)"
    if isinstance(error, EOFError):
        return "ends early (truncated?)"
    first = str(error).split(". ")[0].splitlines()[0][:120] if str(error) else ""
    return f"cannot be read ({type(error).__name__}{': ' + first if first else ''}; truncated or corrupt?)"


def holds_unfinished_run(path: Path) -> bool:
    """Whether `path` is a checkpoint of a run that stopped before its last epoch (resume it, do not redo
    it). A damaged file raises CheckpointError: it is neither overwritten nor taken as finished."""
    return path.is_file() and not load_checkpoint(path).get("finished", False)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a kill during the write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Experiment]:
    """The trained network and its experiment, for reports and retrieval examples."""
    state = load_checkpoint(path)
    exp = experiment_from_dict(state["config"])
    model = build_model(exp.model, state["in_channels"], exp.train.seed)
    model.load_state_dict(state["model"])
    return model.eval(), exp
