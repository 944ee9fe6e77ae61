"""Both notebooks run top to bottom against the test store and show its tables and figures inline."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tests.helpers import WAIT_S

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("compare_losses.ipynb", "gradient_analysis.ipynb")


@pytest.fixture(scope="module")
def executed(store) -> dict[str, nbformat.NotebookNode]:
    """Each notebook executed once; both kernels run at the same time (their start-up dominates)."""
    env = {
        "SMOOTHAP_TRACKING_URI": store.uri,
        "SMOOTHAP_EXPERIMENT": store.experiment,
        "SMOOTHAP_OPTUNA_STORAGE": store.optuna,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernels inherit this process's environment
    notebooks = {name: nbformat.read(REPO / "notebooks" / name, as_version=4) for name in NOTEBOOKS}
    clients = [
        NotebookClient(
            nb,
            timeout=WAIT_S,  # per cell, and for each kernel to start (nbclient's own default is 60 s)
            startup_timeout=WAIT_S,
            kernel_name="python3",
            resources={"metadata": {"path": str(REPO / "notebooks")}},
        )
        for nb in notebooks.values()
    ]

    async def run_all() -> None:
        await asyncio.gather(*(client.async_execute() for client in clients))

    try:
        asyncio.run(run_all())
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebooks


def outputs(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    return [
        out["data"][mime]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if mime in out.get("data", {})
    ]


def test_compare_losses_shows_the_report_table_and_figures(executed, report_dir):
    notebook = executed["compare_losses.ipynb"]
    markdown = "\n".join(outputs(notebook, "text/markdown"))
    written = (report_dir / "comparison_folder.md").read_text()
    table_rows = [line for line in written.splitlines() if line.startswith("| ")]
    assert table_rows and all(row in markdown for row in table_rows)  # the very table the report wrote
    assert "loss.params.temperature" in markdown  # the ablation table
    # recall, validation curves, two Optuna studies, temperature, ablation, retrieval examples
    assert len(outputs(notebook, "image/png")) == 7


def test_gradient_analysis_shows_its_figures(executed, grad_dir):
    notebook = executed["gradient_analysis.ipynb"]
    assert len(outputs(notebook, "image/png")) == 3
    profile = pd.read_csv(grad_dir / "grad_by_rank.csv")
    shown = "\n".join(outputs(notebook, "text/html"))
    for loss in profile["loss"].unique():
        assert loss in shown  # the per-loss summary table under the rank figure
