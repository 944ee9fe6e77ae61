"""Plain-text metric tables for the terminal."""

from __future__ import annotations


def metrics_table(rows: dict[str, dict[str, float]], prefix: str = "test/") -> str:
    """One row per run name, one column per metric under `prefix` (recall first, by K), as aligned text."""
    keys = sorted({k for m in rows.values() for k in m if k.startswith(prefix)}, key=_metric_order)
    if not keys:
        return "(no test metrics)"
    names = [k[len(prefix) :] for k in keys]
    width = max([len("loss")] + [len(r) for r in rows])
    lines = ["  ".join([f"{'loss':<{width}}"] + [f"{n:>13}" for n in names])]
    for name, metrics in rows.items():
        cells = [f"{metrics[k]:>13.4f}" if k in metrics else f"{'-':>13}" for k in keys]
        lines.append("  ".join([f"{name:<{width}}"] + cells))
    return "\n".join(lines)


def _metric_order(key: str) -> tuple[int, int, str]:
    name = key.rsplit("/", 1)[-1]
    if name.startswith("recall_at_"):
        return (0, int(name[len("recall_at_") :]), key)
    return (1, 0, key)
