"""Plain-text metric tables for the terminal."""

from __future__ import annotations


def metrics_table(rows: dict[str, dict[str, float]], prefix: str = "test/") -> str:
    """One row per run name, one column per metric under `prefix` (recall first, by K), as aligned text."""
    keys = sorted(
        {k for m in rows.values() for k in m if k.startswith(prefix)},
        key=lambda k: metric_order(k[len(prefix) :]),
    )
    if not keys:
        return "(no test metrics)"
    names = [k[len(prefix) :] for k in keys]
    width = max([len("loss")] + [len(r) for r in rows])
    lines = ["  ".join([f"{'loss':<{width}}"] + [f"{n:>13}" for n in names])]
    for name, metrics in rows.items():
        cells = [f"{metrics[k]:>13.4f}" if k in metrics else f"{'-':>13}" for k in keys]
        lines.append("  ".join([f"{name:<{width}}"] + cells))
    return "\n".join(lines)


# the table columns after Recall@K, in order (bench.report.tables labels them)
METRIC_ORDER = ("map_at_r", "r_precision", "coarse_recall_at_1", "coarse_map_at_r", "nmi", "ami", "f1")


def metric_order(metric: str) -> tuple[int, int, str]:
    """Recall@K by K, then MAP@R, R-Precision, the coarse-label R@1 and MAP@R, NMI, AMI, F1, then any other
    metric by name."""
    if metric.startswith("recall_at_"):
        return (0, int(metric[len("recall_at_") :]), metric)
    rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return (1 + rank, 0, metric)
