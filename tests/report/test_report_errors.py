"""A report over a missing or empty experiment says so and writes nothing; a failure midway leaves nothing."""

from __future__ import annotations

import pytest

from bench.cli import main
from bench.report import ReportError, make_grad_report, make_report, report


def test_missing_experiment_names_what_the_store_has(store, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ReportError, match=r"experiment 'nope' not found .* it has: .*reptest"):
        make_report(store.uri, "nope", out, optuna_storage=store.optuna)
    assert not out.exists()


def test_experiment_without_final_runs_is_an_error(store, tmp_path):
    out = tmp_path / "out"
    for make in (
        lambda: make_report(store.uri, "empty", out, optuna_storage=store.optuna),
        lambda: make_grad_report(store.uri, "empty", out),
    ):
        with pytest.raises(ReportError, match="no finished runs tagged stage=final"):
            make()
    assert not out.exists()


def test_missing_store_is_not_created(tmp_path):
    db = tmp_path / "absent" / "mlflow.db"
    with pytest.raises(ReportError, match="no MLflow store"):
        make_report(f"sqlite:///{db}", "omniglot", tmp_path / "out")
    assert not db.exists() and not (tmp_path / "out").exists()


def test_cli_reports_the_error_and_exits_2(store, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "report",
            "--experiment",
            "empty",
            "--tracking-uri",
            store.uri,
            "--optuna-storage",
            store.optuna,
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "error: experiment 'empty'" in capsys.readouterr().err
    assert not out.exists()


def test_failure_midway_leaves_the_output_folder_untouched(store, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.md").write_text("previous report\n")

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report.figures, "recall_figure", broken)  # after the tables were rendered
    with pytest.raises(RuntimeError, match="figure failed"):
        make_report(store.uri, store.experiment, out, optuna_storage=store.optuna)
    assert [p.name for p in out.iterdir()] == ["old.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
