"""Cross-batch memory (`loss.memory_size`, `loss.memory_start_step`): the queue holds exactly the last M
detached embeddings in order; in training each step's loss ranks the batch against the batch and the queue,
and equals the loss on that concatenated set; the queue is part of the checkpoint, so a run interrupted and
resumed ends like an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

import losses
from bench.config import ConfigError
from bench.train import build_trainer, load_checkpoint, train_and_evaluate
from bench.train.memory import CrossBatchMemory
from tests.helpers import tiny_bundle, tiny_experiment
from tests.losses.test_ref_embeddings import smooth_ap_rows

CPU = torch.device("cpu")


def test_the_queue_holds_the_last_items_oldest_first_and_detached():
    memory = CrossBatchMemory(size=5)
    items = torch.arange(14.0).reshape(7, 2).requires_grad_(True)
    labels = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    first = items[:2]
    assert (
        len(memory) == 0 and memory.with_batch(first, labels[:2])[0] is first
    )  # an empty memory adds nothing
    memory.push(items[0:3] * 1.0, labels[0:3])
    assert memory.labels.tolist() == [10, 11, 12]
    memory.push(items[3:6] * 1.0, labels[3:6])  # six items: the oldest one leaves
    assert memory.labels.tolist() == [11, 12, 13, 14, 15]
    assert memory.embeddings.tolist() == [[2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    memory.push(items[6:] * 1.0, labels[6:])
    assert memory.labels.tolist() == [12, 13, 14, 15, 16]
    assert memory.embeddings.tolist() == [[4, 5], [6, 7], [8, 9], [10, 11], [12, 13]]
    assert not memory.embeddings.requires_grad
    batch = torch.tensor([[0.5, 0.5]], requires_grad=True)
    retrieval, retrieval_labels = memory.with_batch(batch, torch.tensor([99]))
    assert retrieval.tolist() == [[0.5, 0.5], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13]]
    assert retrieval_labels.tolist() == [99, 12, 13, 14, 15, 16]
    retrieval.sum().backward()  # the batch is live, the memory is not
    assert batch.grad.tolist() == [[1.0, 1.0]] and items.grad is None


def test_a_memory_smaller_than_a_batch_keeps_its_last_items():
    memory = CrossBatchMemory(size=2)
    memory.push(torch.arange(8.0).reshape(4, 2), torch.tensor([1, 2, 3, 4]))
    assert memory.labels.tolist() == [3, 4] and memory.embeddings.tolist() == [[4, 5], [6, 7]]


class Spy(torch.nn.Module):
    """Smooth-AP that records what each step's loss was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = losses.get_loss("smooth_ap", temperature=0.1), []

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, query_offset=0):
        refs = None if ref_embeddings is None else (ref_embeddings.detach().clone(), ref_labels.clone())
        value = self.inner(embeddings, labels, ref_embeddings, ref_labels, query_offset)
        self.calls.append((embeddings.detach().clone(), labels.clone(), refs, float(value.detach())))
        return value


def test_each_step_ranks_the_batch_against_itself_and_the_last_embeddings_from_the_start_step(tmp_path):
    """M = 24 (a batch and a half), from step 2: steps 0-1 see their batch alone, step 2 an empty memory;
    then the batch followed by the last 24 embeddings of the steps since step 2, and each step's value is
    Smooth-AP of the batch's queries over that concatenation, from its formula."""
    exp = tiny_experiment(tmp_path, extra=["loss.memory_size=24", "loss.memory_start_step=2"])
    spy = Spy()
    trainer, _ = build_trainer(exp, spy, tiny_bundle(), CPU)
    trainer.train()
    assert len(spy.calls) == 6
    seen_emb, seen_labels = [], []
    for step, (emb, labels, refs, value) in enumerate(spy.calls):
        if step < 3:
            assert refs is None, step
        else:
            expected_memory = torch.cat(seen_emb)[-24:], torch.cat(seen_labels)[-24:]
            assert torch.equal(refs[0], torch.cat([emb, expected_memory[0]]))
            assert torch.equal(refs[1], torch.cat([labels, expected_memory[1]]))
            rows = smooth_ap_rows(emb.double(), labels, refs[0].double(), refs[1], 0, 0.1, False)
            assert value == pytest.approx(sum(rows) / len(rows), abs=1e-6)
        if step >= 2:
            seen_emb.append(emb)
            seen_labels.append(labels)
    assert torch.equal(trainer.memory.embeddings, torch.cat(seen_emb)[-24:])


class InterruptAt(torch.nn.Module):
    """A real loss (with its queries x gallery form) that raises KeyboardInterrupt on its `at`-th call."""

    def __init__(self, inner: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, query_offset=0):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(embeddings, labels, ref_embeddings, ref_labels, query_offset)


def test_a_run_with_memory_interrupted_and_resumed_ends_like_an_uninterrupted_one(tmp_path, monkeypatch):
    bundle = tiny_bundle()
    extra = ["loss.memory_size=24", "loss.memory_start_step=1"]
    whole = train_and_evaluate(
        tiny_experiment(tmp_path / "whole", epochs=3, extra=extra),
        bundle=bundle,
        progress=False,
        device="cpu",
    )
    exp = tiny_experiment(tmp_path / "cut", epochs=3, extra=extra)
    real_get_loss = losses.get_loss
    monkeypatch.setattr(losses, "get_loss", lambda name, **p: InterruptAt(real_get_loss(name, **p), at=5))
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(exp, bundle=bundle, progress=False, device="cpu")
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "omniglot" / "smooth_ap-seed0" / "last.pt")
    assert state["epoch"] == 1 and state["memory"]["labels"].numel() == 24
    monkeypatch.setattr(losses, "get_loss", real_get_loss)
    resumed = train_and_evaluate(exp, bundle=bundle, progress=False, device="cpu", resume=True)
    assert whole.test_metrics and resumed.test_metrics == whole.test_metrics
    without_memory = train_and_evaluate(
        tiny_experiment(tmp_path / "plain", epochs=3), bundle=bundle, progress=False, device="cpu"
    )
    assert without_memory.test_metrics != whole.test_metrics  # the memory changed the run


class SquareOnly(torch.nn.Module):
    def forward(self, embeddings, labels):
        return embeddings.sum() * 0.0


def test_a_loss_without_the_queries_x_gallery_form_cannot_have_a_memory(tmp_path, monkeypatch):
    monkeypatch.setitem(losses._REGISTRY, "square_only", losses.make_spec("square_only", SquareOnly))
    exp = tiny_experiment(tmp_path, extra=["loss.name=square_only", "loss.memory_size=8"])
    with pytest.raises(
        ConfigError, match=r"loss.memory_size: loss 'square_only' \(SquareOnly\) has no queries x"
    ):
        build_trainer(exp, SquareOnly(), tiny_bundle(), CPU)
