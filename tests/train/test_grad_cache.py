"""Gradient caching (`train.chunk_size`, `CachedStep`): with frozen BatchNorm a chunked step's parameter
gradients are the unchunked step's; a chunk's random state is replayed, so a model that draws random numbers
(dropout) gets the gradient of the embeddings it was scored on; a seeded run equals the unchunked run."""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial

import pytest
import torch

import losses
from bench.train import build_trainer, train_and_evaluate
from bench.train.steps import CachedStep, PlainStep, StepSettings
from tests.helpers import tiny_bundle, tiny_experiment

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def first_batch(trainer):
    trainer.sampler.set_epoch(0)
    return next(iter(trainer.loader))


def plain_step(trainer) -> PlainStep:
    """The plain step with the settings and loss `trainer`'s own step was built with."""
    return PlainStep(trainer.step.settings, trainer.step.loss)


def cached(trainer, chunk_size: int, settings: StepSettings | None = None) -> CachedStep:
    """The gradient-cached step with the settings (or `settings`) and loss of `trainer`'s own step."""
    return CachedStep(settings or trainer.step.settings, trainer.step.loss, chunk_size)


def step_gradients(
    tmp_path, bundle, loss_name: str, make_step, double: bool = True
) -> dict[str, torch.Tensor]:
    """The parameter gradients one step leaves behind, from the seeded initial weights, on the first batch."""
    exp = tiny_experiment(tmp_path, extra=["model.freeze_bn=true", f"loss.name={loss_name}"])
    trainer, _ = build_trainer(exp, losses.get_loss(loss_name), bundle, CPU)
    trainer.step = step = make_step(trainer)
    images, labels = first_batch(trainer)
    if double:
        trainer.model.double()
        images = images.double()
    trainer.model.train()
    torch.manual_seed(5)  # the same random state (Blackbox AP's margin) for every step compared
    step(trainer, images, labels)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", losses.available_losses())
def test_chunked_gradients_equal_the_plain_step_with_frozen_batchnorm(tmp_path, bundle, loss_name):
    """Float64 weights, chunks of B/4 and of 1 image: every parameter gradient within 1e-6."""
    batch = tiny_experiment(tmp_path).data.batch_size
    plain = step_gradients(tmp_path, bundle, loss_name, plain_step)
    assert len(plain) > 2 and all(g.abs().sum() > 0 for g in plain.values())
    for chunk in (batch // 4, 1):
        chunked = step_gradients(tmp_path, bundle, loss_name, partial(cached, chunk_size=chunk))
        assert chunked.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(
                chunked[name], grad, rtol=0, atol=1e-6, msg=f"{name}, chunks of {chunk}"
            )


def test_a_chunk_is_replayed_with_its_random_state(tmp_path, bundle):
    """With dropout in the head, the replayed chunks must draw the masks the first pass drew: the gradient is
    then autograd's through the chunk-by-chunk forward, and the random stream goes on after the step as it
    does after that forward and the loss (Blackbox AP draws its margins from it too)."""
    exp = tiny_experiment(tmp_path, extra=["model.freeze_bn=true", "loss.name=blackbox_ap"])
    grads, after = [], []
    for chunked in (True, False):
        trainer, _ = build_trainer(exp, losses.get_loss("blackbox_ap"), bundle, CPU)
        trainer.model.head = torch.nn.Sequential(torch.nn.Dropout(0.5), trainer.model.head)
        trainer.model.train()
        images, labels = first_batch(trainer)
        torch.manual_seed(9)
        if chunked:
            cached(trainer, 4)(trainer, images, labels)
        else:  # the reference: the same chunks embedded one after the other, with a graph
            embeddings = torch.cat([trainer.model(chunk) for chunk in images.split(4)])
            trainer.loss_fn(embeddings, labels).backward()
        after.append(torch.rand(3))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert torch.equal(after[0], after[1])
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_batchnorm_in_training_mode_warns_at_start_up(tmp_path, bundle):
    with pytest.warns(UserWarning, match=r"train.chunk_size=4 with BatchNorm in training mode"):
        build_trainer(
            tiny_experiment(tmp_path, extra=["train.chunk_size=4", "loss.name=triplet"]),
            losses.get_loss("triplet"),
            bundle,
            CPU,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exp = tiny_experiment(
            tmp_path, extra=["train.chunk_size=4", "model.freeze_bn=true", "loss.name=triplet"]
        )
        trainer, _ = build_trainer(exp, losses.get_loss("triplet"), bundle, CPU)
    assert isinstance(trainer.step, CachedStep) and trainer.step.chunk_size == 4


def test_a_seeded_run_with_chunks_ends_with_the_metrics_of_one_without(tmp_path, bundle):
    runs = {}
    for chunk in ("null", "4"):
        exp = tiny_experiment(
            tmp_path / chunk, epochs=3, extra=["model.freeze_bn=true", f"train.chunk_size={chunk}"]
        )
        runs[chunk] = train_and_evaluate(exp, bundle=bundle, progress=False, device="cpu")
    plain, chunked = runs["null"], runs["4"]
    assert plain.test_metrics.keys() == chunked.test_metrics.keys() and plain.test_metrics
    for key, value in plain.test_metrics.items():
        assert chunked.test_metrics[key] == pytest.approx(value, abs=1e-6), key
    plain_weights = torch.load(plain.checkpoint, weights_only=True)["model"]
    chunked_weights = torch.load(chunked.checkpoint, weights_only=True)["model"]
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(chunked_weights[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_batchnorm_statistics_are_updated_once_per_cached_step(tmp_path, bundle):
    """BatchNorm in training mode: one chunk holding the whole batch leaves the running statistics the plain
    step leaves (the replay must not update them a second time), and the gradients agree too."""
    exp = tiny_experiment(tmp_path)  # model.freeze_bn off: BatchNorm in training mode
    batch = exp.data.batch_size
    stats, grads = {}, {}
    for name, make_step in (("plain", plain_step), ("cached", partial(cached, chunk_size=batch))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the start-up warning about chunked BatchNorm
            trainer, _ = build_trainer(exp, losses.get_loss("smooth_ap"), bundle, CPU)
        step = make_step(trainer)
        norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms
        trainer.model.train()
        images, labels = first_batch(trainer)
        before = norms[0].running_mean.clone()
        step(trainer, images, labels)
        assert not torch.equal(norms[0].running_mean, before)  # the step did update them
        stats[name] = {
            k: v.clone() for k, v in trainer.model.state_dict().items() if "running" in k or "tracked" in k
        }
        grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert stats["cached"].keys() == stats["plain"].keys()
    for key, value in stats["plain"].items():
        torch.testing.assert_close(stats["cached"][key], value, rtol=0, atol=1e-6, msg=key)
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["cached"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cached_step_lays_out_chunks_not_a_second_copy_of_the_batch(tmp_path, bundle):
    """With channels_last on (forced here: it applies on CUDA only), each chunk reaches the model in that
    layout and no operation makes a full-batch copy of the images."""
    from torch.utils._python_dispatch import TorchDispatchMode

    exp = tiny_experiment(tmp_path, extra=["model.freeze_bn=true", "loss.name=triplet"])
    trainer, _ = build_trainer(exp, losses.get_loss("triplet"), bundle, CPU)
    images, labels = first_batch(trainer)
    seen = []

    def record(module, inputs):
        seen.append((inputs[0].shape[0], inputs[0].is_contiguous(memory_format=torch.channels_last)))

    trainer.model.register_forward_pre_hook(record)
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == images.shape:
                copies.append(str(func))
            return out

    channels_last = dataclasses.replace(trainer.step.settings, channels_last=True)
    with Copies():
        cached(trainer, 4, channels_last)(trainer, images, labels)
    assert seen == [(4, True)] * (2 * (labels.numel() // 4))  # each chunk, first pass and replay
    assert copies == []
