"""`bench epochs`: the real `bench train` in each checkout, read back from its MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.benchmarks.epoch_bench import EpochCase, TreeResult, physical_limit, run_epoch_bench, table

REPO = Path(__file__).resolve().parents[2]


def test_the_table_averages_every_epoch_and_takes_ratios_to_the_first_tree():
    old = TreeResult(Path("a"), "old", epochs=[[100.0, 300.0], [200.0, 200.0]], wall_s=[10.0, 20.0])
    new = TreeResult(Path("b"), "new", epochs=[[500.0, 700.0]], wall_s=[4.0])
    old.metrics = [{"test/recall_at_1": 0.5}, {"test/recall_at_1": 0.7}]
    new.metrics = [{"test/recall_at_1": 0.6}]
    rows = table([old, new]).set_index("tree")
    assert rows.loc["old", "images/s"] == 200 and rows.loc["new", "images/s"] == 600
    assert (
        rows.loc["old", "images/s after epoch 1"] == 250 and rows.loc["new", "images/s after epoch 1"] == 700
    )
    assert rows.loc["new", "ratio"] == 3.0 and rows.loc["old", "run wall s"] == 15.0
    assert (
        rows.loc["old", "test/recall_at_1"] == "0.6000 ± 0.1000"
        and rows.loc["new", "test/recall_at_1"] == "0.6000"
    )


def test_the_flops_of_a_training_image_are_the_convnets_by_hand():
    # 28 px through 3x3 convs 1-16-32-64-128, each followed by a 2x2 ceil pool: 28, 14, 7, 4 px
    forward = 2 * 9 * (28 * 28 * 16 * 1 + 14 * 14 * 32 * 16 + 7 * 7 * 64 * 32 + 4 * 4 * 128 * 64)
    first = 2 * 9 * 28 * 28 * 16 * 1  # no gradient for the input images
    head = 2 * 128 * 128
    by_hand = forward + head + forward + (forward - first) + 2 * head  # forward, dL/dW, dL/dX
    assert physical_limit(EpochCase(), threads=1)["mflop_per_image"] == pytest.approx(by_hand / 1e6)


def test_two_checkouts_train_the_same_seeds_and_report_them(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\n"
        "data: {name: omniglot, root: datasets/omniglot, image_size: 8, val_fraction: 0.2, batch_size: 16,\n"
        "       samples_per_class: 4, augment: true}\n"
        "model: {backbone: convnet, embedding_dim: 16}\n"
        "train: {epochs: 2, seed: 0}\n"
        "eval: {batch_size: 512}\n"
        "tracking: {experiment: tiny}\n"
    )
    lines: list[str] = []
    results = run_epoch_bench(
        [REPO, REPO], EpochCase(str(config), epochs=2), repeats=2, progress=lines.append
    )
    assert len(lines) == 4 and all(len(r.epochs) == 2 and all(len(e) == 2 for e in r.epochs) for r in results)
    assert all(v > 0 for r in results for e in r.epochs for v in e)
    # run r trains seed r in every tree: the same code gives the same numbers, and other seeds other numbers
    first, second = results
    assert first.metrics == second.metrics
    assert first.metrics[0]["test/map_at_r"] != first.metrics[1]["test/map_at_r"]
