"""Tables and plots from results files written by the experiment runner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}"


def format_result(results: Mapping[str, Any]) -> str:
    """One run as a small table: per task absolute and normalized test accuracy, then the averages."""
    datasets = list(results.get("datasets", []))
    test = results.get("test", {})
    selection = results.get("selection", {})
    width = max([len(d) for d in datasets] + [8])
    lines = [f"{results.get('model')} | {results.get('method', {}).get('name')} | {len(datasets)} tasks | {selection}"]
    lines.append(f"{'task'.ljust(width)}  {'top1':>6}  {'norm':>6}")
    for d in datasets:
        lines.append(f"{d.ljust(width)}  {_pct(test.get(f'{d}:top1')):>6}  {_pct(test.get(f'{d}:normalized_top1')):>6}")
    lines.append(f"{'average'.ljust(width)}  {_pct(test.get('avg_top1')):>6}  {_pct(test.get('avg_normalized_top1')):>6}")
    if results.get("results_path"):
        lines.append(f"saved to {results['results_path']}")
    return "\n".join(lines)


def method_table(rows: Mapping[str, Mapping[str, Any]], datasets: Sequence[str] | None = None, normalized: bool = False) -> str:
    """Markdown table: one row per method (name -> results dict), one column per task, then the average."""
    if datasets is None:
        datasets = []
        for res in rows.values():
            for d in res.get("datasets", []):
                if d not in datasets:
                    datasets.append(d)
    metric = "normalized_top1" if normalized else "top1"
    head = "| method | " + " | ".join(datasets) + " | avg |"
    sep = "|---|" + "---|" * (len(datasets) + 1)
    lines = [head, sep]
    for name, res in rows.items():
        test = res.get("test", {})
        cells = [_pct(test.get(f"{d}:{metric}")) for d in datasets]
        cells.append(_pct(test.get(f"avg_{metric}")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(paths: Sequence[str | Path]) -> dict[str, dict]:
    """Results files by a readable name (method full name and mask variant)."""
    from tallmasks.eval.results import read_json

    out = {}
    for path in paths:
        res = read_json(path)
        out[Path(path).stem] = res
    return out


def plot_alpha_curves(results: Mapping[str, Mapping[str, Any]], path: str | Path, metric: str = "avg_normalized_top1") -> Path:
    """Validation ``metric`` against alpha for every run that searched a grid; saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tallmasks.checkpoints import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, res in results.items():
        val = res.get("val", {})
        try:
            points = sorted((float(a), float(m[metric])) for a, m in val.items())
        except (TypeError, ValueError, KeyError):
            continue
        if len(points) > 1:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric.replace("_", " ") + " (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path
