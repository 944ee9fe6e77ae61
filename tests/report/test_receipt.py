"""The report's fairness receipt: checked from the store's tags, printed under the comparison table, and a
comparison that breaks it refused (naming the runs) unless --allow-unfair, which marks the table.

The runs here are logged by hand with known hashes, so every expected line is known in advance; the receipt of
runs trained for real is checked on the session store (tests/report/conftest.py) and in
tests/train/test_fairness.py.
"""

from __future__ import annotations

import hashlib

import pytest
from mlflow.tracking import MlflowClient

from bench.cli import main
from bench.report import make_report, receipt
from bench.report.runs import final_runs

LOSSES = ("smooth_ap", "triplet", "contrastive")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def log_final(tracker, loss: str, seed: int, init: str | None, batches: str | None) -> str:
    tags = {"stage": "final"}
    if init is not None:
        tags.update(
            {"fairness.init_hash": init, "fairness.batches_hash": batches, "fairness.splits": "val,test"}
        )
    run = tracker.start_run(f"{loss}-seed{seed}", tags)
    tracker.log_params(run, {"loss": loss, "dataset": "folder", "seed": seed})
    tracker.log_metrics(run, {"test/recall_at_1": 0.5, "test/map_at_r": 0.2}, step=1)
    tracker.end_run(run)
    return run


def log_trial(tracker, number: int, splits: str, stage: str = "trial") -> str:
    run = tracker.start_run(f"study-trial{number}", {"stage": stage, "fairness.splits": splits})
    tracker.end_run(run, "FINISHED")
    return run


@pytest.fixture
def fair(tracker) -> dict[tuple[str, int], str]:
    """Three losses at seeds 0 and 1, each seed with its own shared hashes; two trials on validation."""
    runs = {
        (loss, seed): log_final(tracker, loss, seed, digest(f"init{seed}"), digest(f"batches{seed}"))
        for seed in (0, 1)
        for loss in LOSSES
    }
    log_trial(tracker, 0, "val")
    log_trial(tracker, 1, "val")
    return runs


def read(tracker) -> receipt.Receipt:
    return receipt.read_receipt(tracker, final_runs(tracker))


def test_a_fair_comparison_shows_one_pair_of_hashes_per_seed(tracker, fair):
    fairness = read(tracker)
    assert receipt.breaches(fairness) == []
    lines = receipt.render(fairness, "folder").splitlines()
    for seed in (0, 1):
        init, batches = digest(f"init{seed}")[:12], digest(f"batches{seed}")[:12]
        assert (
            f"- seed {seed} (Smooth-AP, Contrastive, Triplet): initial weights `{init}` (shared), "
            f"batch stream `{batches}` (shared)"
        ) in lines
    assert "- tuning: 2 trial runs; splits evaluated: val (2); none evaluated a test split" in lines
    assert not any("unchecked" in line or "Broken" in line for line in lines)


def test_other_initial_weights_at_one_seed_are_named_with_both_hashes(tracker, fair):
    odd = log_final(tracker, "fastap", 1, digest("other init"), digest("batches1"))
    found = receipt.breaches(read(tracker))
    assert len(found) == 1
    assert found[0].startswith("folder seed 1: initial weights differ: ")
    assert f"fastap (run {odd})" in found[0] and digest("other init")[:12] in found[0]
    assert f"smooth_ap (run {fair[('smooth_ap', 1)]})" in found[0] and digest("init1")[:12] in found[0]
    lines = receipt.render(read(tracker), "folder")
    assert "initial weights **differ**" in lines and "batch stream `" in lines


def test_another_batch_stream_at_one_seed_breaks_the_receipt(tracker, fair):
    odd = log_final(tracker, "fastap", 0, digest("init0"), digest("other batches"))
    (found,) = receipt.breaches(read(tracker))
    assert found.startswith("folder seed 0: batch stream differ: ") and odd in found


@pytest.mark.parametrize(
    ("stage", "splits"), [("trial", "val,test"), ("cv_fold", "val,test"), ("trial", "val,test_small")]
)
def test_a_tuning_run_that_evaluated_a_test_split_breaks_the_receipt(tracker, fair, stage, splits):
    leak = log_trial(tracker, 7, splits, stage)
    (found,) = receipt.breaches(read(tracker))
    assert found == f"tuning run study-trial7 (run {leak}, stage={stage}) evaluated {splits}"


def test_runs_without_a_receipt_are_listed_as_unchecked(tracker, fair):
    bare = log_final(tracker, "fastap", 0, None, None)
    log_final(tracker, "blackbox_ap", 1, digest("init1"), "")  # resumed without its earlier batch digests
    fairness = read(tracker)
    assert receipt.breaches(fairness) == []
    lines = receipt.render(fairness, "folder").splitlines()
    assert f"- without a receipt, unchecked: FastAP seed 0 (run {bare})" in lines
    seed1 = next(line for line in lines if line.startswith("- seed 1 "))
    assert seed1.startswith("- seed 1 (Smooth-AP, Blackbox AP, Contrastive, Triplet): initial weights `")
    assert seed1.endswith(f"batch stream `{digest('batches1')[:12]}` (shared), unchecked for Blackbox AP")


def report_args(tracking_uri, tmp_path, *extra: str) -> list[str]:
    return [
        "report",
        "--experiment",
        "tiny",
        "--tracking-uri",
        tracking_uri,
        "--optuna-storage",
        f"sqlite:///{tmp_path / 'no-optuna.db'}",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


def test_the_report_refuses_an_unfair_comparison_naming_the_runs(
    tracker, tracking_uri, fair, tmp_path, capsys
):
    odd = log_final(tracker, "fastap", 1, digest("other init"), digest("batches1"))
    leak = log_trial(tracker, 7, "val,test")
    assert main(report_args(tracking_uri, tmp_path)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: refusing to compare: ") and "--allow-unfair" in error
    assert odd in error and fair[("smooth_ap", 1)] in error and leak in error
    assert not (tmp_path / "out").exists()

    assert main(report_args(tracking_uri, tmp_path, "--allow-unfair")) == 0
    markdown = (tmp_path / "out" / "comparison_folder.md").read_text()
    assert markdown.startswith(receipt.UNFAIR_MARK)
    assert (tmp_path / "out" / "comparison_folder.tex").read_text().startswith(f"% {receipt.UNFAIR_MARK}")
    table_end = markdown.index("best mean in bold")
    broken = markdown.index("**Broken** (rendered anyway with --allow-unfair):")
    assert table_end < markdown.index("**Fairness receipt**") < broken
    assert odd in markdown[broken:] and leak in markdown[broken:]
    assert "**Fairness receipt**" in capsys.readouterr().out  # the command prints it under the table


def test_a_fair_report_is_not_marked(tracker, tracking_uri, fair, tmp_path):
    written = make_report(tracking_uri, "tiny", tmp_path / "out", optuna_storage=None)
    markdown = (tmp_path / "out" / "comparison_folder.md").read_text()
    assert tmp_path / "out" / "comparison_folder.md" in written
    assert receipt.UNFAIR_MARK not in markdown and "**Broken**" not in markdown
    assert f"initial weights `{digest('init0')[:12]}` (shared)" in markdown


def test_the_session_report_prints_the_receipt_of_its_trained_runs(store, report_dir):
    """The conftest store: Smooth-AP and triplet trained for real at seed 0, five more final runs logged by
    hand without tags."""
    client = MlflowClient(store.uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == store.experiment]
    finals = client.search_runs([experiment.experiment_id], "tags.stage = 'final'")
    trained = [r for r in finals if "fairness.init_hash" in r.data.tags]
    assert sorted(r.data.params["loss"] for r in trained) == ["smooth_ap", "triplet"]
    init = {r.data.tags["fairness.init_hash"] for r in trained}
    batches = {r.data.tags["fairness.batches_hash"] for r in trained}
    assert len(init) == len(batches) == 1
    markdown = (report_dir / "comparison_folder.md").read_text()
    expected = (
        f"- seed 0 (Smooth-AP, Triplet): initial weights `{init.pop()[:12]}` (shared), "
        f"batch stream `{batches.pop()[:12]}` (shared)"
    )
    assert expected in markdown.splitlines()
    unchecked = next(line for line in markdown.splitlines() if "unchecked" in line)
    bare = [r.info.run_id for r in finals if "fairness.init_hash" not in r.data.tags]
    assert len(bare) == 5 and all(run_id in unchecked for run_id in bare)


@pytest.mark.parametrize("status", ["RUNNING", "KILLED", "FAILED"])
def test_a_trial_killed_before_its_receipt_is_unfinished_not_a_breach(
    tracker, tracking_uri, fair, tmp_path, status
):
    """A trial killed mid-run (SIGKILL leaves its MLflow run RUNNING) never logged `fairness.splits`; the
    missing tag reads as NaN, which must count as no split evaluated, and a real leak still breaks it."""
    killed = tracker.start_run("study-trial5", {"stage": "trial"})
    if status != "RUNNING":
        tracker.end_run(killed, status)
    fairness = read(tracker)
    assert receipt.breaches(fairness) == []
    lines = receipt.render(fairness, "folder").splitlines()
    assert (
        "- tuning: 3 trial runs; splits evaluated: val (2) (1 without a receipt, 1 of them unfinished: "
        "killed, failed or still running); none evaluated a test split"
    ) in lines
    assert main(report_args(tracking_uri, tmp_path)) == 0
    leak = log_trial(tracker, 7, "val,test")
    (found,) = receipt.breaches(read(tracker))
    assert leak in found and killed not in found
