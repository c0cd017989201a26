"""``python -m tallmasks.demo.profiles``: the two fine-tuning profiles of the demo side by side.

Reads the seed-0 summaries of both profiles at 8, 14 and 20 tasks (``results/demo/summary*.json`` from
``python -m tallmasks.demo [--num-tasks N]`` and ``results/demo-paper/summary*.json`` from the same with
``--profile paper``), writes ``results/demo-paper/profiles.json`` (normalized accuracy of every method, the
task vectors' shape, the paper's ViT-B-32 rows) and the figure of normalized accuracy against the number of
tasks, and prints the docs' tables (markdown): the methods against the number of tasks, the task vectors'
shape, and the paper profile's per-task accuracies.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tallmasks.core.errors import TallmasksError
from tallmasks.eval.results import atomic_write_json

TASK_COUNTS = (8, 14, 20)
#: the methods of the figure: summary name -> label
SCALING_METHODS: dict[str, str] = {
    "sum": "Task Arithmetic",
    "ties": "TIES",
    "consensus": "Consensus TA",
    "tall_mask": "TALL mask + TA",
}
PROFILE_LABELS = {"fast": "demo, fast profile", "paper": "demo, paper profile"}


def summary_file(directory: Path, num_tasks: int) -> Path:
    return directory / ("summary.json" if num_tasks == 8 else f"summary_{num_tasks}tasks.json")


def load_profile(directory: Path, label: str, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"settings", "runs": {N: {"normalized": {method: %}, "task_vectors": ...}}} of one profile's summaries;
    ``expected``: the fine-tuning settings every summary must record."""
    runs: dict[str, Any] = {}
    settings = None
    for n in TASK_COUNTS:
        path = summary_file(directory, n)
        if not path.is_file():
            raise TallmasksError(f"{path}: no summary of the {label} profile at {n} tasks (run the demo with --num-tasks {n})")
        summary = json.loads(path.read_text())
        if len(summary.get("tasks", [])) != n or "task_vectors" not in summary:
            raise TallmasksError(f"{path}: not a {n}-task summary with task-vector figures (rerun the demo)")
        if expected is not None and summary.get("settings", {}).get("finetune") != expected:
            raise TallmasksError(f"{path}: its experts were not fine-tuned with the {label} profile (a --quick or other run?)")
        runs[str(n)] = {
            "normalized": {m: 100 * v["avg_normalized_top1"] for m, v in summary["methods"].items()},
            "accuracy": {m: 100 * v["avg_top1"] for m, v in summary["methods"].items()},
            "task_vectors": summary["task_vectors"],
        }
        settings = settings or summary["settings"]["finetune"]
    return {"settings": settings, "runs": runs}


def paper_rows(model: str = "ViT-B-32") -> dict[str, dict[str, float | None]]:
    from tallmasks.report.tables import paper_table

    table = paper_table()
    return {str(n): {m: table[(model, n, m)]["normalized"] for (md, k, m) in table if md == model and k == n} for n in TASK_COUNTS}


def shape_table(profiles: dict[str, Any]) -> str:
    """Markdown: one row per profile and task count, the task vectors' shape and the masks' agreement (%)."""
    lines = [
        "| profile | tasks | kurtosis (per task, min-max) | top 20% share of the squared norm | pairwise cosine mean (max) | TALL mask density (min-max) | catastrophic | selfish | kept by all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, profile in profiles.items():
        for n, run in profile["runs"].items():
            shape = run["task_vectors"]
            rows = shape["per_task"].values()

            def spread(key: str, scale: float = 1.0, digits: int = 1, rows: Any = rows) -> str:
                values = [scale * r[key] for r in rows]
                return f"{min(values):.{digits}f}-{max(values):.{digits}f}"

            agreement = shape.get("agreement", {})
            cells = [
                PROFILE_LABELS.get(name, name),
                n,
                spread("kurtosis"),
                spread("top20_share", 100, 0) + "%",
                f"{shape['cosine']['mean']:.3f} ({shape['cosine']['max']:.2f})",
                spread("mask_density", 100, 0) + "%" if "mask_density" in next(iter(rows)) else "",
                *(f"{100 * agreement[k]:.1f}%" if k in agreement else "" for k in ("catastrophic", "selfish", "kept_by_all")),
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def scaling_table(profiles: dict[str, Any], paper: dict[str, Any]) -> str:
    """Markdown: normalized accuracy (%) of the figure's methods and zero-shot, per profile and task count."""
    methods = {"zeroshot": "zero-shot", **SCALING_METHODS, "tall_mask_ties": "TALL mask + TIES"}
    header = (
        "| method | "
        + " | ".join(f"{PROFILE_LABELS[p]}, {n}" for p in profiles for n in TASK_COUNTS)
        + " | "
        + " | ".join(f"paper ViT-B-32, {n}" for n in TASK_COUNTS)
        + " |"
    )
    lines = [header, "|---" * (1 + len(profiles) * len(TASK_COUNTS) + len(TASK_COUNTS)) + "|"]
    for key, label in methods.items():
        cells = [f"{profiles[p]['runs'][str(n)]['normalized'][key]:.1f}" for p in profiles for n in TASK_COUNTS]
        cells += ["" if paper[str(n)].get(key) is None else f"{paper[str(n)][key]:.1f}" for n in TASK_COUNTS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scaling(profiles: dict[str, Any], paper: dict[str, Any], path: Path) -> Path:
    """Normalized accuracy against the number of tasks: one panel per profile and one for the paper (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tallmasks.io.checkpoints import atomic_path

    panels = [(PROFILE_LABELS[p], {n: profiles[p]["runs"][str(n)]["normalized"] for n in TASK_COUNTS}) for p in profiles]
    panels.append(("paper, ViT-B-32", {n: paper[str(n)] for n in TASK_COUNTS}))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), dpi=120, sharey=True)
    for ax, (title, rows) in zip(axes, panels):
        for key, label in SCALING_METHODS.items():
            ax.plot(TASK_COUNTS, [rows[n][key] for n in TASK_COUNTS], marker="o", label=label)
        ax.set_title(title)
        ax.set_xticks(TASK_COUNTS)
        ax.set_xlabel("number of tasks")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalized test accuracy (%)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tallmasks.demo.profiles", description=__doc__.splitlines()[0])
    parser.add_argument("--fast-dir", type=Path, default=Path("results/demo"), help="summaries of the fast profile")
    parser.add_argument("--paper-dir", type=Path, default=Path("results/demo-paper"), help="summaries of the paper profile")
    parser.add_argument("--output", type=Path, default=Path("results/demo-paper/profiles.json"))
    parser.add_argument("--figure", type=Path, default=Path("docs/demo_tasks_scaling.png"))
    args = parser.parse_args(argv)
    try:
        from dataclasses import asdict

        from tallmasks.demo.local import PROFILES

        profiles = {
            name: load_profile(folder, name, asdict(PROFILES[name]))
            for name, folder in (("fast", args.fast_dir), ("paper", args.paper_dir))
        }
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paper = paper_rows()
    atomic_write_json(args.output, {"profiles": profiles, "paper_vit_b32_normalized": paper})
    plot_scaling(profiles, paper, args.figure)
    print(scaling_table(profiles, paper))
    print()
    print(shape_table(profiles))
    from tallmasks.report.tables import summary_table

    for n in TASK_COUNTS:  # the paper profile's per-task tables (test accuracy, %)
        summary = json.loads(summary_file(args.paper_dir, n).read_text())
        print(f"\npaper profile, {n} tasks\n" + summary_table(summary, summary["tasks"], "markdown"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
