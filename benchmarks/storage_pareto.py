"""Accuracy against bytes: every ``compress --values`` setting on the demo's experts, and its time at real size.

Part 1 (``--demo``, after ``make demo``): the demo's newest 8-task TALL masks (task arithmetic, lambda chosen
per task on validation by the demo's ``tall_mask`` run) over its experts, compressed once per setting: the
paper's packbits scheme, the lossless coded format (float32), and the lossy coded settings (bfloat16, int8,
int4, int3, int2), each also with ``--prune-zeros``. Every task is rebuilt from the collection (the
``decompress`` code path) and scored on its test split; normalized accuracy is the mean over tasks of that
accuracy over the fine-tuned expert's. The masks and lambdas are the same for every setting (chosen on the
lossless vector; no setting looks at a test split). Rows go to ``results/storage/demo_pareto.json`` with the
figure ``docs/storage_pareto.png`` (``--tasks 8 14 20``: the 14- and 20-task collections too, after the demo has run with
``--num-tasks 14`` / ``20``; one figure each).

Part 2 (``--synthetic MODEL``): a real-size synthetic collection (random task vectors, ``merge_bench``), in
one run per setting: the time to compress the whole collection and to decompress one task, each beside the
lossless coded format's in the same run (a ratio; the best of ``--repeat`` runs).

    python benchmarks/storage_pareto.py --demo --tasks 8 14 20
    python benchmarks/storage_pareto.py --synthetic ViT-B-32 --tasks 8 --json benchmarks/results/storage_pareto_b32_2cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (values, storage, prune_zeros) of every point
SETTINGS = [("float32", "packbits", False), ("float32", "coded", False)] + [
    (values, "coded", prune) for values in ("bfloat16", "int8", "int4", "int3", "int2") for prune in (False, True)
]
#: task-vector quantization's published points (ViT-B-32, 8 tasks; shared/paper/README.md): bits per weight per
#: task and accuracy relative to the fine-tuned models (3 bits: 90.7 against 90.5; 2 bits: 4 to 8% lower)
TVQ_POINTS = [
    {"label": "TVQ 3 bits", "bits": 3.0, "low": 90.7 / 90.5, "high": 90.7 / 90.5},
    {"label": "TVQ 2 bits", "bits": 2.0, "low": 0.92, "high": 0.96},
]
RTVQ_BITS = 2.4


def label(values: str, storage: str, prune: bool) -> str:
    return f"{storage}/{values}" + ("+prune" if prune else "")


# ---------------------------------------------------------------------------------------------
# part 1: accuracy against bytes on the demo


_ENCODERS: dict = {}


def _evaluate(location: Path, cache: Path, model: str, task: str, state: dict) -> float:
    """Test top-1 of one rebuilt model (its weights copied into one encoder per architecture)."""
    from tallmasks.datasets import load_split
    from tallmasks.eval import Evaluator, load_or_build_split
    from tallmasks.models import ImageEncoder, get_classification_head

    if model not in _ENCODERS:
        _ENCODERS[model] = ImageEncoder(model, pretrained=None)
    encoder = _ENCODERS[model]
    evaluator = Evaluator(encoder, state, "cpu", "fp32", 512)
    evaluator.set_head(task, get_classification_head(model, task, location))
    data = load_or_build_split(
        lambda: load_split(task, "test", location), task, "test", cache / "eval_data", encoder.image_size, encoder.val_preprocess, 0
    )
    correct, total = evaluator.count_correct(task, data)
    return correct / total


def demo_pareto(cache: Path, workdir: Path, settings=SETTINGS, tasks: int = 8) -> list[dict]:
    from collection_bench import demo_collections

    from tallmasks.core.progress import progress
    from tallmasks.eval import read_json
    from tallmasks.eval.selection import FT_FILE
    from tallmasks.storage.collection import collection_report, compress, decompress

    source = next((c for c in demo_collections(cache) if not c["use_ties"] and len(c["names"]) == tasks), None)
    if source is None:
        raise SystemExit(f"{cache}: no {tasks}-task TALL masks of the demo (run `make demo`, or the demo with --num-tasks {tasks})")
    location = Path(source["masks_file"]).parents[2] / "checkpoints"  # <experts>/tall_masks/<model>/<file>
    model = Path(source["masks_file"]).parent.name
    finetuned_top1 = read_json(location / model / FT_FILE)
    names = source["names"]
    rows = []
    for values, storage, prune in progress(settings, desc="settings"):
        target = workdir / label(values, storage, prune).replace("/", "-")
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        compress(
            source["pretrained"],
            source["finetuned"],
            target,
            names=names,
            masks_file=source["masks_file"],
            storage=storage,
            values=values,
            prune_zeros=prune,
        )
        compress_s = time.perf_counter() - start
        report = collection_report(target)
        per_task = {}
        for name in progress(names, desc=label(values, storage, prune), leave=False):
            top1 = _evaluate(location, cache, model, name, decompress(target, name))
            per_task[name] = {"top1": top1, "normalized_top1": top1 / finetuned_top1[name]}
        n, tasks = report["num_params"], len(names)
        rows.append(
            {
                "values": values,
                "storage": storage,
                "prune_zeros": prune,
                "lossy": bool(report["values"].get("lossy")),
                "tasks": tasks,
                "num_params": n,
                "bytes": report["total_bytes"],
                "paper_bytes": report["paper_bytes"],
                "ratio_to_paper": report["total_bytes"] / report["paper_bytes"],
                "bits_per_weight_per_task": 8 * report["total_bytes"] / (n * tasks),
                "mask_bits_per_weight_per_task": report["mask_bits_per_weight_per_task"],
                "max_abs_error": report["values"].get("max_abs_error", 0.0),
                "normalized_accuracy": sum(t["normalized_top1"] for t in per_task.values()) / tasks,
                "absolute_accuracy": sum(t["top1"] for t in per_task.values()) / tasks,
                "per_task": per_task,
                "compress_s": round(compress_s, 2),
            }
        )
        shutil.rmtree(target, ignore_errors=True)
    lossless = next(r["normalized_accuracy"] for r in rows if r["storage"] == "coded" and r["values"] == "float32" and not r["prune_zeros"])
    for row in rows:
        row["accuracy_vs_lossless"] = row["normalized_accuracy"] / lossless
    return rows


def plot_pareto(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tallmasks.io.checkpoints import atomic_path

    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=120)
    for prune, marker, name in ((False, "o", "coded, quantized values"), (True, "s", "coded, quantized values + --prune-zeros")):
        points = sorted(
            (r for r in rows if r["storage"] == "coded" and r["lossy"] and r["prune_zeros"] == prune),
            key=lambda r: r["bits_per_weight_per_task"],
        )
        ax.plot(
            [r["bits_per_weight_per_task"] for r in points],
            [100 * r["accuracy_vs_lossless"] for r in points],
            marker=marker,
            label=name,
        )
        for r in points:
            ax.annotate(
                r["values"],
                (r["bits_per_weight_per_task"], 100 * r["accuracy_vs_lossless"]),
                fontsize=7,
                xytext=(3, -9 if prune else 3),
                textcoords="offset points",
            )
    for storage, values, marker, name in (
        ("packbits", "float32", "D", "paper's scheme (packbits, float32)"),
        ("coded", "float32", "*", "ours, lossless (coded, float32)"),
    ):
        r = next(r for r in rows if r["storage"] == storage and r["values"] == values and not r["prune_zeros"])
        ax.scatter([r["bits_per_weight_per_task"]], [100 * r["accuracy_vs_lossless"]], marker=marker, s=70, zorder=3, label=name)
    for point in TVQ_POINTS:
        mid, half = 50 * (point["low"] + point["high"]), 50 * (point["high"] - point["low"])
        ax.errorbar([point["bits"]], [mid], yerr=[[half], [half]], fmt="^", color="gray", capsize=3)
        ax.annotate(
            point["label"] + " (published, ViT-B-32, % of full precision)",
            (point["bits"], mid),
            fontsize=7,
            xytext=(6, -3),
            textcoords="offset points",
            color="gray",
        )
    ax.axvline(RTVQ_BITS, color="gray", linestyle=":", linewidth=1)
    ax.annotate(
        "RTVQ ~2.4 bits (published)",
        (RTVQ_BITS, ax.get_ylim()[0]),
        fontsize=7,
        color="gray",
        rotation=90,
        xytext=(3, 5),
        textcoords="offset points",
    )
    ax.set_xlabel("bits per weight per task (beyond theta_0)")
    ax.set_ylabel("TALL + TA test accuracy, % of the lossless collection's")
    ax.set_title(f"Demo, {rows[0]['tasks']} tasks: accuracy against storage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# part 2: time at real size


def synthetic_times(model: str, tasks: int, workdir: Path, values_list: list[str], repeat: int) -> list[dict]:
    from merge_bench import synthesize

    from tallmasks.storage.collection import collection_report, compress, decompress

    pt, fts = synthesize(model, tasks, workdir / f"synthetic-{model}-{tasks}")
    names = [f"Task{t}" for t in range(tasks)]
    times: dict[str, dict[str, list[float]]] = {}
    sizes = {}
    for _ in range(repeat):  # interleaved rounds: float32 and every lossy setting in each
        for values in ["float32", *values_list]:
            target = workdir / f"collection-{values}"
            shutil.rmtree(target, ignore_errors=True)
            start = time.perf_counter()
            compress(pt, fts, target, names=names, values=values)
            compressed = time.perf_counter() - start
            start = time.perf_counter()
            decompress(target, names[0])
            decompressed = time.perf_counter() - start
            entry = times.setdefault(values, {"compress": [], "decompress": []})
            entry["compress"].append(compressed)
            entry["decompress"].append(decompressed)
            sizes[values] = collection_report(target)
    rows = []
    base = times["float32"]
    for values in ["float32", *values_list]:
        t = times[values]
        rows.append(
            {
                "collection": f"{model}, {tasks} tasks, random task vectors",
                "values": values,
                "bytes": sizes[values]["total_bytes"],
                "ratio_to_paper": sizes[values]["ratio_to_paper"],
                "compress_s": round(min(t["compress"]), 2),
                "decompress_one_task_s": round(min(t["decompress"]), 2),
                "compress_vs_lossless": min(t["compress"]) / min(base["compress"]),
                "decompress_vs_lossless": min(t["decompress"]) / min(base["decompress"]),
                "runs": repeat,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", nargs="?", const=".demo_cache", help="the demo's cache folder (default .demo_cache)")
    parser.add_argument("--out", default=str(REPO / "results" / "storage" / "demo_pareto.json"), help="the demo rows (JSON)")
    parser.add_argument("--figure", default=str(REPO / "docs" / "storage_pareto.png"), help="the figure of the demo rows")
    parser.add_argument("--synthetic", help="open_clip model of a synthetic collection to time (e.g. ViT-B-32)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[8], help="task counts (demo: each needs its masks; synthetic: the first)")
    parser.add_argument("--values", nargs="+", default=["bfloat16", "int8", "int4"], help="lossy settings to time beside float32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="the timing rows (JSON)")
    parser.add_argument("--workdir", help="collections and synthetic checkpoints (default: a temporary folder, removed)")
    args = parser.parse_args()
    if not (args.demo or args.synthetic):
        parser.error("choose --demo and/or --synthetic MODEL")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tallmasks-pareto-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.demo:
            rows = []
            for tasks in args.tasks:
                these = demo_pareto(Path(args.demo), workdir, tasks=tasks)
                figure = Path(args.figure)
                plot_pareto(these, figure if tasks == args.tasks[0] else figure.with_name(f"{figure.stem}_{tasks}tasks{figure.suffix}"))
                rows += these
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1) + "\n")
            print(f"{'tasks':<6}{'setting':<24}{'bytes':>10}{'x paper':>9}{'bits/w/task':>12}{'norm. acc':>10}{'x lossless':>11}")
            for r in rows:
                print(
                    f"{r['tasks']:<6}{label(r['values'], r['storage'], r['prune_zeros']):<24}{r['bytes']:>10,}{r['ratio_to_paper']:>9.3f}"
                    f"{r['bits_per_weight_per_task']:>12.3f}{100 * r['normalized_accuracy']:>9.1f}%{r['accuracy_vs_lossless']:>11.4f}"
                )
        if args.synthetic:
            rows = synthetic_times(args.synthetic, args.tasks[0], workdir, args.values, args.repeat)
            for r in rows:
                print(
                    f"{r['values']:<10} {r['bytes']:>12,} B  x paper {r['ratio_to_paper']:.3f}  compress {r['compress_s']:.1f} s "
                    f"({r['compress_vs_lossless']:.2f}x)  decompress one task {r['decompress_one_task_s']:.2f} s ({r['decompress_vs_lossless']:.2f}x)"
                )
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
