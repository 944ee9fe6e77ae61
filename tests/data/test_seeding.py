"""Per-sample augmentation seeds (`bench.data.seeding`): the draw a sample gets is torch.manual_seed's, and
loading it leaves nothing behind for CUDA."""

from __future__ import annotations

import numpy as np
import torch

from bench.data.omniglot import TensorImages
from bench.data.seeding import SeededSamples


def _augmenting_dataset() -> TensorImages:
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(12, 1, 28, 28, generator=generator) > 0.7).float()
    return TensorImages(images, np.repeat(np.arange(3), 4), augment=True)


def test_a_sample_is_augmented_as_under_torch_manual_seed_without_seeding_cuda(monkeypatch):
    dataset = _augmenting_dataset()
    cases = [(0, 5), (3, 2**62 + 7), (11, 123456789)]
    expected = []
    for index, seed in cases:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected.append(dataset[index])
    # torch.manual_seed also seeds CUDA, which before CUDA starts means formatting a stack trace to queue the
    # call: done per sample, that was most of an Omniglot epoch's time
    cuda_seedings = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: cuda_seedings.append(seed))
    seeded = SeededSamples(dataset)
    for (index, seed), (image, label) in zip(cases, expected, strict=True):
        got, got_label = seeded[(index, seed)]
        assert torch.equal(got, image) and got_label == label
    assert cuda_seedings == []
