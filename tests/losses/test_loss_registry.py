"""Registry: every loss builds from defaults and from a sampled search-space point and trains a step."""

import optuna
import pytest
import torch

import losses
from losses import available_losses, get_loss, get_spec

EXPECTED = {"smooth_ap", "triplet", "contrastive", "multi_similarity", "fastap", "blackbox_ap"}


def forward_backward(loss: torch.nn.Module) -> None:
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(24, 8), dim=1).requires_grad_(True)
    labels = torch.arange(6).repeat(4)
    value = loss(emb, labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_all_named_losses_are_registered():
    assert EXPECTED <= set(available_losses())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_from_defaults(name):
    forward_backward(get_loss(name))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_from_sampled_search_space(name):
    spec = get_spec(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    params = spec.search_space(trial)
    assert set(params) == set(trial.params), "search-space names must be the suggested parameter names"
    assert set(params) <= set(spec.param_names())
    forward_backward(get_loss(name, **params))


def test_unknown_parameter_names_loss_and_valid_ones():
    with pytest.raises(ValueError, match=r"'smooth_ap' has no parameter 'temprature'.*temperature"):
        get_loss("smooth_ap", temprature=0.1)


def test_unknown_loss_lists_available():
    with pytest.raises(ValueError, match="unknown loss 'nope'.*smooth_ap"):
        get_loss("nope")


def test_register_rejects_defaults_the_class_does_not_take():
    class Tiny(torch.nn.Module):
        def __init__(self, scale: float = 1.0):
            super().__init__()

    with pytest.raises(ValueError, match="scal"):
        losses.register("tiny_test_loss", Tiny, {"scal": 2.0})
    assert "tiny_test_loss" not in available_losses()
