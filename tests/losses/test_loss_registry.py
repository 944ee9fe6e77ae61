"""Registry: every registered loss builds from its signature's defaults and from a sampled search-space point
and trains a step; `register` reads the defaults from the constructor and rejects what it cannot use."""

import inspect

import optuna
import pytest
import torch

import losses
from bench.cli.commands import _loss_list
from bench.config import load_experiment
from bench.report.tables import display_name
from bench.tune import TuneJob
from losses import available_losses, get_loss, get_spec, resolve_loss_names

DESIGN_NAMES = {"smooth_ap", "triplet", "contrastive", "multi_similarity", "fastap", "blackbox_ap"}
REGISTERED = available_losses()  # collected at import: a new file in losses/ is covered with no list to edit

# The defaults of the six losses before they moved into the signatures (each module's DEFAULTS dict, and
# smooth_ap's chunk_elements from its signature): every published number was computed with these.
PREVIOUS_DEFAULTS = {
    # backend and tf32 choose how, not what, it computes: `auto` is the torch path on a CPU, TF32 off
    "smooth_ap": {
        "temperature": 0.01,
        "include_self": False,
        "chunk_elements": 2**22,
        "backend": "auto",
        "tf32": False,
    },
    "triplet": {"margin": 0.1, "miner": "semihard"},
    "contrastive": {"pos_margin": 0.0, "neg_margin": 1.0},
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
    "fastap": {"num_bins": 10},
    # the authors' algorithm since issue 17: same numbers, their meaning (lambda on normalised ranks, the
    # margin the scale of a random shift), their optional terms off
    "blackbox_ap": {
        "lambda_val": 4.0,
        "margin": 0.02,
        "variant": "authors",
        "interclass_coef": 0.0,
        "batch_memory": 0,
    },
    # the losses after Smooth-AP (issue 26), with their authors' defaults (see each module's docstring)
    "roadmap": {
        "temperature": 0.01,
        "rho": 100.0,
        "offset": 1.44,
        "delta": 0.05,
        "start": 0.5,
        "calibration_weight": 1.0,
        "pos_margin": 0.9,
        "neg_margin": 0.6,
        "include_self": True,
    },
    "recall_at_k": {
        "temperature": 0.01,
        "k_values": (1, 2, 4, 8, 16),
        "k_temperatures": (1.0, 2.0, 4.0, 8.0, 16.0),
        "include_self": True,
    },
    "pnp": {"variant": "D_q", "alpha": 4.0, "temperature": 0.01, "b": 2.0, "include_self": True},
}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(24, 8), dim=1)
    return emb, torch.arange(6).repeat(4)


def forward_backward(loss: torch.nn.Module) -> None:
    emb, labels = batch()
    emb.requires_grad_(True)
    value = loss(emb, labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by the test vanish with it."""
    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))


def test_all_named_losses_are_registered():
    assert DESIGN_NAMES <= set(REGISTERED)
    assert all(get_spec(name).search_space is not None for name in DESIGN_NAMES)


@pytest.mark.parametrize("name", REGISTERED)
def test_builds_from_defaults(name):
    forward_backward(get_loss(name))


@pytest.mark.parametrize("name", REGISTERED)
def test_builds_from_sampled_search_space(name):
    spec = get_spec(name)
    if spec.search_space is None:
        pytest.skip(f"{name} has no search space")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    params = spec.search_space(trial)
    assert set(params) == set(trial.params), "search-space names must be the suggested parameter names"
    assert set(params) <= set(spec.param_names())
    forward_backward(get_loss(name, **params))


@pytest.mark.parametrize("name", REGISTERED)
def test_defaults_are_the_constructor_signature_defaults(name):
    spec = get_spec(name)
    parameters = list(inspect.signature(spec.cls.__init__).parameters.values())[1:]  # without self
    assert all(p.default is not p.empty for p in parameters), f"{name}: a parameter has no default"
    assert spec.defaults == {p.name: p.default for p in parameters}
    assert list(spec.defaults) == spec.param_names()
    emb, labels = batch()  # get_loss(name) with no parameters is the class built with no arguments
    torch.manual_seed(1)
    from_registry = get_loss(name)(emb, labels)
    torch.manual_seed(1)
    assert torch.equal(from_registry, spec.cls()(emb, labels))


@pytest.mark.parametrize("name", sorted(PREVIOUS_DEFAULTS))
def test_defaults_are_unchanged(name):
    assert get_spec(name).defaults == PREVIOUS_DEFAULTS[name]


def test_unknown_parameter_names_loss_and_valid_ones():
    with pytest.raises(ValueError, match=r"'smooth_ap' has no parameter 'temprature'.*temperature"):
        get_loss("smooth_ap", temprature=0.1)


def test_unknown_loss_lists_available():
    with pytest.raises(ValueError, match="unknown loss 'nope'.*smooth_ap"):
        get_loss("nope")


class Tiny(torch.nn.Module):
    def __init__(self, scale: float = 1.0, *, mode: str = "mean"):
        super().__init__()
        self.scale, self.mode = scale, mode


def test_register_reads_defaults_from_the_signature(scratch_registry):
    spec = losses.register("tiny_test_loss", Tiny, miner="none")
    assert spec.defaults == {"scale": 1.0, "mode": "mean"} and spec.miner == "none"
    built = get_loss("tiny_test_loss", mode="sum")
    assert (built.scale, built.mode) == (1.0, "sum")


class NoDefaultPositional(torch.nn.Module):
    def __init__(self, margin: float, scale: float = 1.0):
        super().__init__()


class NoDefaultKeyword(torch.nn.Module):
    def __init__(self, scale: float = 1.0, *, margin: float):
        super().__init__()


@pytest.mark.parametrize("cls", [NoDefaultPositional, NoDefaultKeyword])
def test_register_rejects_a_parameter_without_default(cls, scratch_registry):
    with pytest.raises(ValueError, match=r"loss 'tiny_test_loss': parameter 'margin' of \w+ has no default"):
        losses.register("tiny_test_loss", cls)
    assert "tiny_test_loss" not in available_losses()


def test_register_rejects_a_defaults_dict_in_place_of_the_search_space(scratch_registry):
    """register's former signature took a defaults dict third: such a call fails instead of misreading it."""
    with pytest.raises(TypeError, match=r"'tiny_test_loss': search_space must be a function.*scal"):
        losses.register("tiny_test_loss", Tiny, {"scal": 2.0})
    assert "tiny_test_loss" not in available_losses()


def test_register_rejects_a_name_taken_by_another_class(scratch_registry):
    with pytest.raises(ValueError, match="'smooth_ap' is already registered by losses.smooth_ap"):
        losses.register("smooth_ap", Tiny)
    assert get_spec("smooth_ap").cls.__name__ == "SmoothAP"
    same = get_spec("triplet")
    losses.register("triplet", same.cls, same.search_space, same.miner)  # re-importing a module is fine
    assert get_spec("triplet") == same


LATER = ["roadmap", "recall_at_k", "pnp"]


def test_the_extended_set_is_the_six_design_losses_then_the_later_ones():
    assert resolve_loss_names(["extended"]) == [*sorted(DESIGN_NAMES, key=losses.DESIGN_LOSSES.index), *LATER]
    assert set(LATER) <= set(REGISTERED)
    # a set expands in place among other names; a name it already holds keeps its first place
    assert resolve_loss_names(["pnp", "extended", "smooth_ap"]) == ["pnp", *losses.DESIGN_LOSSES, *LATER[:2]]


def test_without_names_the_main_job_keeps_every_loss_but_the_later_ones(scratch_registry):
    losses.register("tiny_test_loss", Tiny)  # an outside loss (--loss-module) stays in by default
    default = resolve_loss_names(None)
    assert set(DESIGN_NAMES) | {"tiny_test_loss"} <= set(default)
    assert not set(LATER) & set(default)
    assert resolve_loss_names([]) == default


def test_the_cli_loss_list_expands_the_set_and_checks_every_name():
    """`run` and `tune` read `--losses` through this one function; the job they build checks the names."""
    assert _loss_list("extended") == resolve_loss_names(["extended"])
    assert _loss_list(" smooth_ap , pnp") == ["smooth_ap", "pnp"]
    assert _loss_list(None) == resolve_loss_names(None)
    with pytest.raises(ValueError, match="unknown loss 'extnded'"):
        TuneJob(load_experiment("omniglot"), _loss_list("extnded"))


@pytest.mark.parametrize("name", resolve_loss_names(["extended"]))
def test_every_loss_of_the_extended_set_has_a_display_name(name):
    assert display_name(name) != name
