"""The table's note on search ranges: which loss's best tuned value sat at an edge of its range."""

from __future__ import annotations

import pandas as pd

from bench.tune.edges import study_edge_hits


def edge_frame(studies: dict[str, object]) -> pd.DataFrame:
    """One row per (loss, parameter) whose study's best value is at an edge: the study, value, range and
    side."""
    rows = [
        {
            "loss": loss,
            "study": study.study_name,
            "param": hit.param,
            "value": hit.value,
            "low": hit.low,
            "high": hit.high,
            "log": hit.log,
            "side": hit.side,
        }
        for loss, study in studies.items()
        for hit in study_edge_hits(study)
    ]
    return pd.DataFrame(rows, columns=["loss", "study", "param", "value", "low", "high", "log", "side"])


def edge_notes(edges: pd.DataFrame, studies: dict[str, object]) -> str:
    """Markdown lines for under the comparison table; says so too when no range was hit."""
    if not studies:
        return ""
    if edges.empty:
        return "\nSearch ranges: no loss's best tuned value lies at an edge of its range.\n"
    lines = [
        "",
        "Search ranges: these best tuned values lie at an edge of their range, so the optimum may lie "
        "beyond it and the loss may be understated (`smoothap-bench run --widen 10` retunes them):",
    ]
    for row in edges.itertuples():
        scale = "log " if row.log else ""
        lines.append(
            f"- {row.loss}: {row.param} = {row.value:.4g} at the {row.side} edge of its {scale}range "
            f"[{row.low:g}, {row.high:g}] (study {row.study})"
        )
    return "\n".join(lines) + "\n"
