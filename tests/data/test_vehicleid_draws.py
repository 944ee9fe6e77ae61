"""VehicleID's gallery protocol: seeded draws of one gallery image per vehicle, read from the on-disk format,
and an evaluation that embeds the test set once and reports the mean (and spread) over the draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dataset_trees import vehicleid_tree

from bench.clustering import clustering_metrics
from bench.config import DataConfig, EvalConfig
from bench.data import DatasetError, EvalSplit, load_dataset
from bench.data.omniglot import TensorImages
from bench.data.vehicleid import GALLERY_DRAWS, gallery_draws, one_per_class_gallery
from bench.evaluate import embed, evaluate_split
from tests.helpers import clustered

CPU = torch.device("cpu")
RETRIEVAL = ("recall_at_1", "recall_at_5", "map_at_r", "r_precision")


def load_gallery(tree, **options):
    config = DataConfig(
        name=tree.name,
        root=str(tree.root),
        image_size=8,
        val_fraction=0.0,
        options={"protocol": "gallery", **options},
    )
    return load_dataset(config)


def gallery_keys(draws) -> set[tuple[int, ...]]:
    return {tuple(gallery.tolist()) for _, gallery in draws}


def brute_force(
    x: np.ndarray, labels: np.ndarray, query: np.ndarray, gallery: np.ndarray
) -> dict[str, float]:
    """Musgrave et al.'s definitions, query -> gallery, a query at a time, float64, ties by gallery index."""
    x64 = x.astype(np.float64)
    totals = dict.fromkeys(RETRIEVAL, 0.0)
    evaluated = 0
    for i in query:
        sims = x64[gallery] @ x64[i]
        rel = labels[gallery][np.lexsort((np.arange(len(gallery)), -sims))] == labels[i]
        r = int(rel.sum())
        if r == 0:
            continue
        evaluated += 1
        totals["recall_at_1"] += float(rel[:1].any())
        totals["recall_at_5"] += float(rel[:5].any())
        totals["r_precision"] += rel[:r].sum() / r
        totals["map_at_r"] += sum(rel[:k].sum() / k for k in range(1, r + 1) if rel[k - 1]) / r
    return {key: value / evaluated for key, value in totals.items()}


class CountingFlatten(torch.nn.Flatten):
    """Flatten (1 x 1 x D images -> their D values), counting the images it embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return super().forward(x)


# ------------------------------------------------------------------------------------------------ the draws


def test_each_draw_has_one_gallery_image_per_vehicle_and_the_rest_as_queries(tmp_path):
    tree = vehicleid_tree(tmp_path)
    bundle = load_gallery(tree, seed=3)
    assert [s.name for s in bundle.tests] == ["test_small", "test_medium", "test"]
    for split in bundle.tests:
        vehicles = split.query.class_ids  # the whole test list: the draws index into it
        assert split.gallery is None and len(split.draws) == GALLERY_DRAWS
        assert sorted(set(vehicles.tolist())) == sorted(set(tree.expected[split.name].values()))
        for query, gallery in split.draws:
            assert sorted(vehicles[gallery].tolist()) == sorted(set(vehicles.tolist()))  # each vehicle once
            assert np.array_equal(np.sort(np.concatenate([query, gallery])), np.arange(len(vehicles)))
    assert len(gallery_keys(bundle.tests[-1].draws)) >= 5, "the draws repeat one gallery"


def test_the_same_seed_gives_the_same_draws_and_another_seed_others(tmp_path):
    tree = vehicleid_tree(tmp_path)
    first, again = load_gallery(tree, seed=3).tests[-1], load_gallery(tree, seed=3).tests[-1]
    other = load_gallery(tree, seed=4).tests[-1]
    for (q1, g1), (q2, g2) in zip(first.draws, again.draws, strict=True):
        assert np.array_equal(q1, q2) and np.array_equal(g1, g2)
    assert [tuple(g) for _, g in first.draws] != [tuple(g) for _, g in other.draws]


def test_draw_d_is_seeded_by_seed_and_d_alone():
    labels = np.repeat(np.arange(50), 4)
    ten = gallery_draws(labels, seed=5, draws=10)
    assert len(gallery_keys(ten)) == 10  # 4^50 possible galleries: any repeat is a reused draw
    for d, (query, gallery) in enumerate(ten):
        expected = one_per_class_gallery(labels, np.random.default_rng([5, d]))  # the documented seed
        assert np.array_equal(query, expected[0]) and np.array_equal(gallery, expected[1])
    three = gallery_draws(labels, seed=5, draws=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(three, ten[:3], strict=True))


def test_every_image_of_a_vehicle_is_equally_likely_in_the_gallery():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    picks = np.concatenate([gallery for _, gallery in gallery_draws(labels, seed=0, draws=3000)])
    share = np.bincount(picks, minlength=len(labels)) / 3000
    expected = 1 / np.bincount(labels)[labels]
    assert share == pytest.approx(expected, abs=0.04)


def test_the_number_of_draws_is_an_option(tmp_path):
    tree = vehicleid_tree(tmp_path)
    assert [len(s.draws) for s in load_gallery(tree, gallery_draws=3).tests] == [3, 3, 3]
    for options, key in [
        ({"gallery_draws": 0}, "gallery_draws"),
        ({"gallery_draws": "10"}, "gallery_draws"),
        ({"gallery_draws": True}, "gallery_draws"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(DatasetError, match=rf"data.options.{key} must be an integer >= \d, got"):
            load_gallery(tree, **options)


def test_draws_need_the_whole_set_as_query():
    images = TensorImages(torch.zeros(4, 1, 1, 2), np.array([0, 0, 1, 1]))
    draw = (np.array([1, 3]), np.array([0, 2]))
    with pytest.raises(ValueError, match="draws needs gallery=None"):
        EvalSplit("test", images, images, draws=[draw])
    with pytest.raises(ValueError, match="at least one draw"):
        EvalSplit("test", images, draws=[])


# ------------------------------------------------------------------------------------------- the evaluation


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_evaluation_embeds_once_and_reports_the_mean_and_spread_over_draws(backend):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), rng.integers(2, 7, size=30))
    x = clustered(rng, labels, 8, noise=1.2)
    draws = gallery_draws(labels, seed=0, draws=10)
    split = EvalSplit(
        "test", TensorImages(torch.from_numpy(x)[:, None, None, :], labels), ks=(1, 5), draws=draws
    )
    model = CountingFlatten()
    got = evaluate_split(model, split, EvalConfig(backend=backend), CPU)
    assert model.images == len(labels), "the test set is embedded more than once"
    per_draw = np.array([[brute_force(x, labels, q, g)[key] for key in RETRIEVAL] for q, g in draws])
    assert len(np.unique(per_draw[:, 0])) > 3, "draws that score alike cannot tell a reused draw"
    assert [got[f"test/{key}"] for key in RETRIEVAL] == pytest.approx(per_draw.mean(axis=0), abs=1e-12)
    std = per_draw.std(axis=0, ddof=1)
    assert [got[f"test_draw_std/{key}"] for key in RETRIEVAL] == pytest.approx(std, abs=1e-12)
    for key, value in clustering_metrics(x, labels).items():  # the whole set, clustered once
        assert got[f"test/{key}"] == pytest.approx(value, abs=1e-12)


def test_one_draw_reports_its_metrics_and_no_spread():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(12), 3)
    x = clustered(rng, labels, 8, noise=1.2)
    draws = gallery_draws(labels, seed=2, draws=1)
    split = EvalSplit(
        "test_small", TensorImages(torch.from_numpy(x)[:, None, None, :], labels), ks=(1, 5), draws=draws
    )
    got = evaluate_split(torch.nn.Flatten(), split, EvalConfig(), CPU, clustering=False)
    assert got == pytest.approx(
        {f"test_small/{k}": v for k, v in brute_force(x, labels, *draws[0]).items()}, abs=1e-12
    )


def test_the_on_disk_gallery_protocol_evaluates_as_the_mean_of_its_draws(tmp_path):
    split = load_gallery(vehicleid_tree(tmp_path), seed=1).tests[-1]
    model = torch.nn.Flatten()
    x, labels = embed(model, split.query, CPU), split.query.labels
    per_draw = [brute_force(x, labels, q, g) for q, g in split.draws]
    got = evaluate_split(model, split, EvalConfig(), CPU, clustering=False)
    for key in RETRIEVAL:
        assert got[f"test/{key}"] == pytest.approx(np.mean([m[key] for m in per_draw]), abs=1e-12)
