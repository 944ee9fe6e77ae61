from collections import Counter

import numpy as np
import pytest

from bench.data.samplers import PKSampler


def uneven_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = [1, 2, 3, 4, 5, 7, 9, 12, 20, 6, 8, 1, 4, 4]
    labels = np.concatenate([np.full(c, cls) for cls, c in enumerate(counts)])
    return labels[rng.permutation(len(labels))]


def test_every_batch_has_p_distinct_classes_with_k_images_each():
    labels = uneven_labels()
    sampler = PKSampler(labels, batch_size=12, samples_per_class=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 12
    for batch in batches:
        classes = Counter(labels[batch].tolist())
        assert len(classes) == 4 and set(classes.values()) == {3}


def test_small_classes_are_topped_up_from_their_own_images_and_singletons_never_drawn():
    labels = uneven_labels()
    sampler = PKSampler(labels, batch_size=8, samples_per_class=4, seed=0)
    assert sampler.dropped_classes == 2
    eligible = [c for c, n in Counter(labels.tolist()).items() if n >= 2]
    ever_seen = Counter()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        seen = Counter()
        for batch in sampler:
            for cls in set(labels[batch].tolist()):
                members = [i for i in batch if labels[i] == cls]
                assert len(members) == 4
                if (labels == cls).sum() >= 4:
                    assert len(set(members)) == 4  # no repeats where the class has enough images
                else:
                    assert set(members) == set(np.flatnonzero(labels == cls))  # all of it, then repeats
                seen[cls] += 1
        visits = [seen[c] for c in eligible]
        assert max(visits) - min(visits) <= 1  # within an epoch, classes are visited round-robin
        ever_seen.update(seen)
    singletons = [c for c, n in Counter(labels.tolist()).items() if n == 1]
    assert not any(ever_seen[c] for c in singletons)


def test_same_seed_and_epoch_repeat_exactly_and_epochs_differ():
    labels = uneven_labels()
    a = PKSampler(labels, 8, 2, seed=5)
    b = PKSampler(labels, 8, 2, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(PKSampler(labels, 8, 2, seed=6)) != list(PKSampler(labels, 8, 2, seed=5))


def test_images_of_large_classes_are_used_before_repeating():
    labels = np.repeat(np.arange(6), 8)
    sampler = PKSampler(labels, batch_size=12, samples_per_class=4, seed=2)
    drawn = [i for batch in sampler for i in batch]
    assert sorted(drawn) == list(range(48))  # one epoch of 4 batches covers every image exactly once


@pytest.mark.parametrize(
    ("batch", "k", "message"),
    [(10, 4, "multiple"), (4, 4, "at least two classes"), (52, 4, "fewer than the 13 classes")],
)
def test_bad_settings_explain_themselves(batch, k, message):
    with pytest.raises(ValueError, match=message):
        PKSampler(uneven_labels(), batch, k)
