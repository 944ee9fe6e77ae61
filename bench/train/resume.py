"""What `--resume` may change: the command's experiment against the one its checkpoint was trained with.

The command describes the run; the checkpoint holds how far it got. They are compared key by key over
`Experiment.flat()`. A change that a run continued from the checkpoint can still honour is applied, printed
and recorded on the MLflow run (tag `resume.changes`); any other change is refused before anything is written,
with every differing key, both values, and the two ways forward.

Honoured, and why the continued run is still the run the command describes:
- `train.epochs`, to no fewer than the epochs already trained: everything random in an epoch is seeded from
  (seed, epoch), so extending a finished run trains the extra epochs exactly as a longer run would have.
- `optim.lr_decay_epochs`, when every step at or before the epochs already trained is unchanged: only the
  schedule's future is edited.
- `eval.*`: how the model is measured, not how it is trained.
- `tracking.uri`, `tracking.log_checkpoint`: where the run is logged (a store that lacks the checkpoint's run
  gets a new run for the remaining epochs).
- `train.checkpoint_dir`: where checkpoints live; the resumed file is named by the command anyway.
- `tune.*`: the tuning budget, unused by the training of one run.
- `data.num_workers`: each sample is loaded under its own seed, so the batches are the same with any number of
  loader workers.
- `train.chunk_size`, with `model.freeze_bn: true`: gradient caching computes the whole batch's gradient to
  rounding whatever the chunks (BatchNorm in training mode would see each chunk's statistics instead).
Everything else (model, loss, data, batch, optimizer, seed, the experiment's and MLflow experiment's names,
numerics such as `train.amp`) changes what the trained network would be, or where the run lives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import ConfigError, Experiment

HONOURED_SECTIONS = ("eval.", "tune.")
HONOURED_KEYS = ("tracking.uri", "tracking.log_checkpoint", "train.checkpoint_dir", "data.num_workers")
CHANGES_TAG = "resume.changes"  # on the MLflow run: what each resume changed, one line per resume
UNSHOWN_VALUES = ("tracking.uri", "tune.storage")  # store URLs may carry a server's password


class _Absent:
    """A key one of the two configs lacks (a loss parameter set on one side only)."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


class ResumeRefused(ConfigError):
    """The command changes settings that a run continued from its checkpoint cannot honour."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    reason: str = ""  # why a refused change cannot be honoured, when the key alone does not say

    def __str__(self) -> str:
        if self.key in UNSHOWN_VALUES:
            return f"{self.key} changed"
        return f"{self.key}: {self.old!r} -> {self.new!r}" + (f" ({self.reason})" if self.reason else "")


def config_changes(stored: Experiment, command: Experiment, trained_epochs: int, path: Path) -> list[Change]:
    """The changes from `stored` (the checkpoint's, after `trained_epochs` epochs) to `command`, all of them
    honourable; otherwise ResumeRefused listing those that are not."""
    old, new = stored.flat(), command.flat()
    changes = []
    for key in dict.fromkeys([*old, *new]):  # config order
        before, after = old.get(key, ABSENT), new.get(key, ABSENT)
        emptied_section = {type(before), type(after)} == {dict, _Absent}  # {} on one side, its keys listed
        if before != after and not emptied_section:
            changes.append(Change(key, before, after))
    frozen_bn = stored.model.freeze_bn and command.model.freeze_bn
    refused = [
        refusal for change in changes if (refusal := _refusal(change, trained_epochs, frozen_bn)) is not None
    ]
    if refused:
        listed = "\n".join(f"  {change}" for change in refused)
        raise ResumeRefused(
            f"cannot resume {path}: a resumed run cannot honour these changes to its config (old -> new):\n"
            f"{listed}\n"
            f"Either drop these changes to continue the run, or start a new run: move {path} aside "
            f"or set another train.checkpoint_dir."
        )
    return changes


def _refusal(change: Change, trained_epochs: int, frozen_bn: bool) -> Change | None:
    """None when `change` can be honoured after `trained_epochs` epochs (with BatchNorm frozen on both sides
    or not), else the change with its reason."""
    if change.key in HONOURED_KEYS or change.key.startswith(HONOURED_SECTIONS):
        return None
    if change.key == "train.chunk_size":
        reason = None if frozen_bn else "BatchNorm in training mode sees each chunk's statistics"
    elif change.key in _RULES:
        reason = _RULES[change.key](change.old, change.new, trained_epochs)
    else:
        return change
    return None if reason is None else Change(change.key, change.old, change.new, reason)


def _epochs(old: int, new: int, trained: int) -> str | None:
    return None if new >= trained else f"{trained} epochs are already trained"


def _schedule(old: list[int], new: list[int], trained: int) -> str | None:
    past_old, past_new = sorted(m for m in old if m <= trained), sorted(m for m in new if m <= trained)
    return None if past_old == past_new else f"steps at or before epoch {trained} were already applied"


_RULES: dict[str, Callable[[Any, Any, int], str | None]] = {
    "train.epochs": _epochs,
    "optim.lr_decay_epochs": _schedule,
}


def describe(changes: list[Change]) -> str:
    """`key: old -> new` for each change, on one line (the MLflow tag and the printed note)."""
    return "; ".join(str(change) for change in changes)
