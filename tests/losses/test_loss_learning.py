"""Every registered loss really learns: a linear embedding of Gaussian clusters, held-out classes."""

import numpy as np
import pytest
import torch

from losses import available_losses, get_loss

SIGNAL, NOISE, EMBED = 4, 12, 8
STEPS = 150


def make_split(rng: np.random.Generator, classes: int, per_class: int):
    """Class means live in a few signal dims; larger nuisance noise fills the others, so a random
    projection retrieves near chance and the embedding has to learn which directions matter."""
    means = rng.normal(size=(classes, SIGNAL)) * 2.0
    labels = np.repeat(np.arange(classes), per_class)
    signal = means[labels] + 0.15 * rng.normal(size=(labels.size, SIGNAL))
    noise = 3.0 * rng.normal(size=(labels.size, NOISE))
    return torch.tensor(np.hstack([signal, noise]), dtype=torch.float32), torch.tensor(labels)


def recall_at_1(emb: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest neighbour by brute force."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[sims.argmax(1)] == labels))


def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(model(x), dim=1)


@pytest.mark.parametrize("name", available_losses())
def test_loss_raises_held_out_recall(name):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train_x, train_y = make_split(rng, classes=40, per_class=8)
    test_x, test_y = make_split(rng, classes=20, per_class=8)
    model = torch.nn.Linear(SIGNAL + NOISE, EMBED)
    loss_fn = get_loss(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with torch.no_grad():
        before = recall_at_1(embed(model, test_x).numpy(), test_y.numpy())
    for _ in range(STEPS):
        # P x K batch: 16 classes x 4 samples (training rows are grouped 8 per class)
        classes = torch.randperm(40)[:16]
        idx = (classes.unsqueeze(1) * 8 + torch.rand(16, 8).argsort(1)[:, :4]).reshape(-1)
        loss = loss_fn(embed(model, train_x[idx]), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = recall_at_1(embed(model, test_x).numpy(), test_y.numpy())
    chance = 7 / (20 * 8 - 1)
    assert before < 0.4, f"task too easy before training: {before:.2f}"
    assert after > max(0.8, before + 0.4), (
        f"{name}: recall@1 {before:.2f} -> {after:.2f} (chance {chance:.2f})"
    )
