"""Experiment configuration: typed dataclasses loaded from YAML, with `--set key.path=value` overrides.

Every error names the full key path (for example `optim.lr`) and the file it came from, so a typo in a
config never silently falls back to a default. Option strings are `Literal` types and sections with rules
beyond their types (`TuneConfig`) check them in `validate`, so a bad value fails at load, not hours later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bench import layout

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key path."""


@dataclass
class DataConfig:
    name: str = "omniglot"
    root: str = "datasets/omniglot"
    image_size: int = 28  # side of the square input, after resizing
    val_fraction: float = 0.2  # last fraction of training classes held out for validation
    batch_size: int = 128  # P x K images per batch
    samples_per_class: int = 4  # K
    num_workers: int = 0
    skip_bad_images: bool = False
    augment: bool = True
    decode: Literal["cpu", "gpu"] = "cpu"  # image files decoded and augmented in loader workers or on the GPU
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific settings


@dataclass
class ModelConfig:
    backbone: str = "convnet"
    embedding_dim: int = 128
    pretrained: bool = False  # ImageNet weights for torchvision backbones, when cached locally
    freeze_bn: bool = False  # the paper's frozen BatchNorm


@dataclass
class LossConfig:
    name: str = "smooth_ap"
    params: dict[str, Any] = field(default_factory=dict)
    # cross-batch memory (Wang et al., CVPR 2020): the last memory_size embeddings (detached) and labels are
    # extra retrieval items for the batch's queries from step memory_start_step on; 0 = no memory
    memory_size: int = 0
    memory_start_step: int = 0

    def validate(self, path: str) -> None:
        for key in ("memory_size", "memory_start_step"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{path}.{key} must be at least 0, got {getattr(self, key)}")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3  # backbone learning rate
    head_lr: float | None = None  # embedding-head learning rate; None = same as lr
    weight_decay: float = 0.0
    lr_decay_epochs: list[int] = field(default_factory=list)  # epochs at which the rates are multiplied
    lr_decay_gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    amp: bool = True  # mixed precision, used only on CUDA
    channels_last: bool = True  # oneDNN and cuDNN convolutions are faster in NHWC
    checkpoint_dir: str = layout.CHECKPOINTS
    grad_clip: float | None = None
    # gradient caching: embed the batch in chunks of chunk_size (None = the whole batch at once); exact with
    # model.freeze_bn, while BatchNorm in training mode sees each chunk's statistics
    chunk_size: int | None = None
    sync_bn: bool = False  # under torchrun, BatchNorm in training mode on the global batch (SyncBatchNorm)

    def validate(self, path: str) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"{path}.chunk_size must be at least 1 (or null), got {self.chunk_size}")


@dataclass
class EvalConfig:
    batch_size: int = 512
    ks: list[int] | None = None  # None = the K list of the dataset's protocol
    every_epochs: int = 1  # validation frequency
    backend: Literal["auto", "faiss", "torch"] = "auto"


@dataclass
class TrackingConfig:
    uri: str = layout.MLFLOW_URI
    artifact_location: str = layout.MLFLOW_ARTIFACTS
    experiment: str = "omniglot"
    log_checkpoint: bool = True


@dataclass
class TuneConfig:
    trials: int = 12
    epochs: int | None = None  # training epochs per trial; None = train.epochs
    final_epochs: int | None = None  # training epochs of each final-seed run; None = train.epochs
    final_seeds: int = 3
    pruner: Literal["median", "hyperband", "none"] = "median"
    sampler_seed: int = 0
    storage: str = layout.OPTUNA_STORAGE
    cv_folds: int = 1  # >1: class-disjoint k-fold over the training classes
    # tuned beside each loss's own space, e.g. {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": true}}
    shared_space: dict[str, Any] = field(default_factory=dict)
    # ranges replacing a loss's own, {loss: {param: [low, high]}}: what `tune --widen` sets for the losses
    # whose best value hit an edge; such a loss is tuned in its own study, `<experiment>-<loss>-widened`
    widen: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for key, minimum in (("trials", 1), ("cv_folds", 1), ("final_seeds", 0)):
            if getattr(self, key) < minimum:
                raise ConfigError(f"{path}.{key} must be at least {minimum}, got {getattr(self, key)}")
        for key, spec in self.shared_space.items():
            check_search_range(f"{path}.shared_space.{key}", spec)
        for loss, ranges in self.widen.items():
            for param, bounds in ranges.items():
                if len(bounds) != 2 or not bounds[0] < bounds[1]:
                    raise ConfigError(
                        f"{path}.widen.{loss}.{param}: expected [low, high] with low < high, got {bounds}"
                    )


SEARCH_RANGE_FIELDS = ("low", "high", "log", "step", "choices")


def check_search_range(where: str, spec: Any) -> None:
    """A `tune.shared_space` entry: {"low", "high", "log"?, "step"?} or {"choices": [...]}."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with low/high or choices, got {spec!r}")
    unknown = sorted(set(spec) - set(SEARCH_RANGE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(SEARCH_RANGE_FIELDS)})")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}.choices: expected a non-empty list, got {spec['choices']!r}")
        return
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: needs low and high, or choices")
    try:
        float(spec["low"]), float(spec["high"])  # YAML 1.1 reads "1e-4" as a string
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: low/high must be numbers, got {spec['low']!r}, {spec['high']!r}"
        ) from None


@dataclass
class Experiment:
    name: str = "omniglot"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, for MLflow params."""
        return dict(_flatten(self.to_dict()))


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def resolve_config_path(name_or_path: str) -> Path:
    """A bundled config name (`omniglot`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no bundled config {name_or_path!r} (available: {names}) and no such file")
    return bundled


def load_experiment(name_or_path: str, overrides: list[str] | None = None) -> Experiment:
    """Load a YAML config, apply `key.path=value` overrides, and validate every key and type."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for override in overrides or []:
        apply_override(raw, override)
    try:
        return build(Experiment, raw, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def experiment_from_dict(raw: dict[str, Any]) -> Experiment:
    """Rebuild an Experiment from `Experiment.to_dict()` output (checkpoints, MLflow artifacts)."""
    return build(Experiment, raw, "")


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a raw config tree; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, _, text = override.partition("=")
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r}: empty key in {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML") from error
    set_path(raw, key.strip(), value)


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` in a raw config tree, creating sections on the way."""
    keys = key.split(".")
    node = raw
    for depth, part in enumerate(keys[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(keys[: depth + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from a raw mapping, checking keys and types and naming the path on error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known keys: {', '.join(sorted(names))})")
    values = {name: _coerce(hints[name], raw[name], f"{path}.{name}" if path else name) for name in raw}
    built = cls(**values)
    if hasattr(built, "validate"):
        built.validate(path)
    return built


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {key: _coerce(item, v, f"{path}.{key}") for key, v in value.items()}
    if hint is Any:
        return value
    if origin is Literal:
        options = typing.get_args(hint)
        if value not in options:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, options))}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    wrong_type = not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    if hint in (int, float, str, bool) and wrong_type:
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value
