"""Reports from the stores: comparison tables, figures and gradient analysis (`make_report`,
`make_grad_report`).

Imported lazily so that `bench.report.console` (used by `train`) does not pull in MLflow and matplotlib.
"""

from __future__ import annotations

__all__ = ["ReportError", "make_grad_report", "make_report"]


def __getattr__(name: str):
    if name in ("make_report", "make_grad_report"):
        from bench.report import report

        return getattr(report, name)
    if name == "ReportError":
        from bench.report.runs import ReportError

        return ReportError
    raise AttributeError(f"module 'bench.report' has no attribute {name!r}")
