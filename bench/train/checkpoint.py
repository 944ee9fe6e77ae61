"""Checkpoints: one `last.pt` per run, written atomically after every epoch, read with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import torch

from bench import layout
from bench.config import Experiment, experiment_from_dict
from bench.models import build_model

CHECKPOINT_FORMAT = 1


def default_checkpoint_path(exp: Experiment) -> Path:
    return layout.run_checkpoint(exp.train.checkpoint_dir, exp.name, exp.loss.name, exp.train.seed)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


def holds_unfinished_run(path: Path) -> bool:
    """Whether `path` is a checkpoint of a run that stopped before its last epoch (resume it, do not redo it)."""
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
