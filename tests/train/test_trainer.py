"""The trainer's contract with its parts: hooks are called at fixed points in a fixed order, and the step is a
replaceable strategy (what the gradient-cached and distributed steps rely on)."""

from __future__ import annotations

import torch

import losses
from bench.train import Hook, PlainStep, build_trainer
from tests.helpers import omniglot_experiment, tiny_omniglot


class Recorder(Hook):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def before_train(self, trainer):
        self.calls.append("before_train")

    def before_epoch(self, trainer):
        self.calls.append(f"before_epoch {trainer.epoch}")

    def after_step(self, trainer, step):
        self.calls.append(f"step {trainer.epoch}.{trainer.batch} loss={step.loss:.6f}")

    def after_epoch(self, trainer):
        self.calls.append(f"after_epoch {trainer.epoch} {sorted(trainer.metrics)}")

    def after_train(self, trainer):
        self.calls.append("after_train")


class CountingStep:
    """A strategy that delegates to the plain step: proves the trainer uses whatever step it is given."""

    def __init__(self, inner: PlainStep) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, trainer, images, labels):
        self.calls += 1
        return self.inner(trainer, images, labels)


def _trainer(tmp_path, bundle, hooks=()):
    exp = omniglot_experiment(tmp_path, "train.epochs=2")
    trainer, _ = build_trainer(exp, losses.get_loss("smooth_ap"), bundle, torch.device("cpu"))
    trainer.hooks = list(hooks)
    return trainer


def test_hooks_are_called_in_order_and_the_step_is_replaceable(tmp_path):
    bundle = tiny_omniglot(per_class=8)
    recorder = Recorder()
    trainer = _trainer(tmp_path, bundle, [recorder])
    trainer.step = counting = CountingStep(trainer.step)
    trainer.train()
    batches = len(trainer.loader)
    assert batches > 1 and counting.calls == 2 * batches
    expected = ["before_train"]
    for epoch in range(2):
        expected.append(f"before_epoch {epoch}")
        expected += [f"step {epoch}.{b}" for b in range(batches)]
        expected.append(f"after_epoch {epoch} ['images_per_s', 'train/grad_norm', 'train/loss']")
    expected.append("after_train")
    assert [c.split(" loss=")[0] for c in recorder.calls] == expected

    plain = _trainer(tmp_path, bundle)  # the same run with the default step: identical weights
    plain.train()
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name


def test_epoch_metrics_are_the_means_of_the_steps(tmp_path):
    recorder = Recorder()

    class Means(Hook):
        def after_epoch(self, trainer):
            losses_seen = [
                float(c.split("loss=")[1]) for c in recorder.calls if c.startswith(f"step {trainer.epoch}.")
            ]
            assert abs(trainer.metrics["train/loss"] - sum(losses_seen) / len(losses_seen)) < 1e-6

    trainer = _trainer(tmp_path, tiny_omniglot(per_class=8), [recorder, Means()])
    trainer.train()
