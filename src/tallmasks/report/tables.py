"""Tables and figures from results: the one table code path of main.py's summary, the demo and
``tallmasks report``.

A run is one results JSON of the experiment runner (or one method of the demo's summary.json). Runs
are grouped by model and task list; every method present appears, in the paper's display order first,
then the others by name. The paper's numbers (package data, ``tallmasks/data/paper``) stand beside ours.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tallmasks.core.schema import Any_, Bool, Int, List, Map, Null, Num, Obj, Str, check, optional

log = logging.getLogger(__name__)

#: the paper's rows, in its display order: key -> label
PAPER_METHODS: dict[str, str] = {
    "zeroshot": "Zero-shot",
    "average": "Weight averaging",
    "sum": "Task Arithmetic",
    "ties": "TIES",
    "consensus": "Consensus TA",
    "consensus_ties": "Consensus TIES",
    "finetuned": "Fine-tuned",
    "magnitude_pruning": "Magnitude pruning",
    "mag_masking": "Magnitude masking",
    "tall_mask": "TALL mask + TA",
    "tall_mask_ties": "TALL mask + TIES",
}
#: method names of the per-dataset file (another group's runs) -> our keys
PER_DATASET_METHODS = {
    "Zero-shot": "zeroshot",
    "Weight Average": "average",
    "Task Arithmetic": "sum",
    "Consensus TA": "consensus",
    "TSV-M": "tsv",
    "TSV-C": "tsv_c",
}
TASK_COUNTS = (8, 14, 20)
NOT_AVAILABLE = "n/a"
#: run fields that do not change what a method computes
_NEUTRAL_FIELDS = frozenset({"name", "full_name", "device", "use_ties", "load_mask"})


# ---------------------------------------------------------------------------------------------
# the one table renderer


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "markdown") -> str:
    """A table as markdown, aligned plain text or CSV; cells are formatted with ``cell``."""
    cells = [[cell(v) for v in row] for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(cells)
        return out.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(map(md_escape, headers)) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(map(md_escape, row)) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def md_escape(text: str) -> str:
    """Text from data as it may stand in a markdown table cell or line: no pipe ends a cell, no line break
    starts a heading, no HTML tag or entity is interpreted."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text
    return text.replace("|", "\\|")


def cell(value: Any) -> str:
    if value is None:
        return NOT_AVAILABLE
    if isinstance(value, float):
        return NOT_AVAILABLE if not math.isfinite(value) else f"{value:.1f}"
    return str(value)


def pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * float(value)


def diff(ours: float | None, paper: float | None) -> str | None:
    return None if ours is None or paper is None else f"{ours - paper:+.1f}"


# ---------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    """One method's test results on one model and task list."""

    model: str
    datasets: tuple[str, ...]
    method: str
    top1: dict[str, float]
    finetuned: dict[str, float] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    val: dict[str, dict] = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    agreement: list[int] | None = None
    mask_path: str | None = None
    source: str = ""

    @property
    def num_tasks(self) -> int:
        return len(self.datasets)

    @property
    def avg_top1(self) -> float:
        return sum(self.top1[d] for d in self.datasets) / self.num_tasks

    def normalized(self, denominators: Mapping[str, float] | None = None) -> float | None:
        """Average of accuracy / fine-tuned accuracy (the run's own denominators unless given)."""
        denominators = self.finetuned if denominators is None else denominators
        if not all(denominators.get(d) for d in self.datasets):
            return None
        return sum(self.top1[d] / denominators[d] for d in self.datasets) / self.num_tasks


def method_key(method: Mapping[str, Any], results: Mapping[str, Any] | None = None) -> str:
    """A readable, stable name of what a run computed: the method's name, ``_ties`` for a TIES base,
    then every hyperparameter that differs from the method's defaults and any correction recorded."""
    name = str(method.get("name"))
    key = f"{name}_ties" if method.get("use_ties") else name
    try:
        from tallmasks.merging import get_method

        defaults = get_method(name).defaults
    except Exception:
        defaults = {}
    extras = [f"{k}={v}" for k, v in sorted(method.items()) if k not in _NEUTRAL_FIELDS and k in defaults and v != defaults[k]]
    if method.get("load_mask"):
        extras.append("loaded masks")
    results = results or {}
    correction = results.get("correction")
    if correction:
        extras.append(str(correction.get("name") if isinstance(correction, Mapping) else correction))
    if results.get("precision") not in (None, "fp32"):
        extras.append(str(results["precision"]))
    if results.get("specify_lambda") is not None:
        extras.append(f"alpha={results['specify_lambda']}")
    return key + (f" ({', '.join(extras)})" if extras else "")


def method_label(key: str) -> str:
    base, _, rest = key.partition(" (")
    label = PAPER_METHODS.get(base, base)
    return f"{label} ({rest}" if rest else label


def method_order(keys: Iterable[str]) -> list[str]:
    order = list(PAPER_METHODS)

    def rank(key: str):
        base = key.partition(" (")[0]
        return (order.index(base) if base in order else len(order), base, key)

    return sorted(set(keys), key=rank)


def run_from_results(results: Mapping[str, Any], source: str = "") -> Run | None:
    """A Run from a runner results dict, or None when it is not one."""
    method, test, datasets = results.get("method"), results.get("test"), results.get("datasets")
    if not isinstance(method, Mapping) or not isinstance(test, Mapping) or not datasets or "name" not in method:
        return None
    try:
        top1 = {d: float(test[f"{d}:top1"]) for d in datasets}
    except (KeyError, TypeError, ValueError):
        return None
    finetuned = {d: float(v) for d, v in (results.get("finetuned_accuracies") or {}).items() if d in datasets}
    params = {k: v for k, v in method.items() if k not in ("name", "full_name")}
    return Run(
        model=str(results.get("model")),
        datasets=tuple(datasets),
        method=method_key(method, results),
        top1=top1,
        finetuned=finetuned,
        params={"name": method["name"], **params},
        val=dict(results.get("val") or {}),
        selection=dict(results.get("selection") or {}),
        agreement=list(results["agreement"]) if results.get("agreement") else None,
        mask_path=results.get("mask_path"),
        source=source,
    )


def runs_from_demo_summary(summary: Mapping[str, Any], source: str = "") -> list[Run]:
    """Runs from the demo's summary.json (its method names are the report's keys)."""
    tasks = list(summary.get("tasks") or [])
    methods = summary.get("methods") or {}
    if not tasks or not isinstance(methods, Mapping) or "finetuned" not in methods:
        return []
    finetuned = {t: float(methods["finetuned"]["per_task"][t]["top1"]) for t in tasks}
    runs = []
    for name, entry in methods.items():
        if name == "finetuned":
            continue
        top1 = {t: float(entry["per_task"][t]["top1"]) for t in tasks}
        agreement = (summary.get("mask_agreement") or {}).get("weights") if name == "tall_mask" else None
        runs.append(
            Run(
                str(summary.get("model")),
                tuple(tasks),
                name,
                top1,
                finetuned,
                {"name": name},
                selection=dict((summary.get("selection") or {}).get(name) or {}),
                agreement=agreement,
                source=source,
            )
        )
    return runs


# ---------------------------------------------------------------------------------------------
# the two results file types, one schema each (checked where a file is read)


def _name_complaint(value: str) -> str | None:
    from tallmasks.core.errors import ConfigError
    from tallmasks.io.guard import safe_name

    try:
        safe_name(value)
    except ConfigError as exc:
        return str(exc).replace(f"name {value!r} ", "").strip() if len(value) <= 80 else "not a plain file name"
    return None


def _number_complaint(value: str) -> str | None:
    try:
        return None if math.isfinite(float(value)) else "not a finite number"
    except ValueError:
        return "not a number"


#: a model, task or method name: it may end up in a figure's file name, so one safe file-name component
NAME = Str(test=_name_complaint)
#: an accuracy, as a fraction
ACCURACY = Num(0.0, 1.0)
#: a fine-tuned accuracy divides every normalized figure: below 0.1% it is not a model's accuracy
DENOMINATOR = Num(1e-3, 1.0)
TASKS = List(NAME, min_len=1, max_len=1024, unique=True)
RESULTS_SCHEMA = Obj(
    {
        "method": Obj({"name": NAME}, {"prun_thre_k": Num(0, 1e6), "use_ties": Bool(), "load_mask": Bool()}),
        "test": Map(Any_((Num(), Null(), Str(), Bool()))),
        "datasets": TASKS,
    },
    {
        "model": NAME,
        "finetuned_accuracies": Map(DENOMINATOR),
        "agreement": optional(List(Int(min=0), max_len=1025)),
        "val": Map(Map(Any_((Num(), Null(), Str(), Bool()))), key=Str(test=_number_complaint)),
        "selection": Obj(),
        "mask_path": optional(Str(max_len=4096)),
    },
)
SUMMARY_SCHEMA = Obj(
    {"tasks": TASKS, "methods": Map(Obj({"per_task": Map(Obj({"top1": ACCURACY}))}), key=NAME)},
    {"model": NAME, "mask_agreement": Obj({}, {"weights": optional(List(Int(min=0), max_len=1025))}), "selection": Map(Obj())},
)


def checked_results(data: Any, source: object) -> str | None:
    """``"results"`` (a runner's results), ``"summary"`` (the demo's summary.json) or None (another JSON),
    after checking the file against its schema and the fields that depend on each other: a one-line
    TallmasksError naming the file and the place when a results file is malformed."""
    from tallmasks.core.errors import TallmasksError

    if not isinstance(data, Mapping):
        return None
    if "method" in data and "test" in data:
        check(data, RESULTS_SCHEMA, source, TallmasksError)
        check(data["test"], Obj({f"{d}:top1": ACCURACY for d in data["datasets"]}), f"{source}: test", TallmasksError)
        return "results"
    if "methods" in data and "tasks" in data:
        check(data, SUMMARY_SCHEMA, source, TallmasksError)
        per_task = Obj({"per_task": Obj({t: Obj({"top1": ACCURACY}) for t in data["tasks"]})})
        check(data["methods"], Obj({"finetuned": per_task}), f"{source}: methods", TallmasksError)
        for name, entry in data["methods"].items():
            check(entry, per_task, f"{source}: methods.{name}", TallmasksError)
        for t in data["tasks"]:
            check(
                data["methods"]["finetuned"]["per_task"][t]["top1"],
                DENOMINATOR,
                f"{source}: methods.finetuned.per_task.{t}.top1",
                TallmasksError,
            )
        return "summary"
    return None


def collect(paths: Sequence[str | Path]) -> tuple[list[Run], list[Path]]:
    """Runs (results JSON files, recursively) and compressed collections (folders) under ``paths``.
    A run found twice (same model, tasks and method) is kept once: a runner's file before a demo summary,
    then the most recent."""
    from tallmasks.core.errors import TallmasksError
    from tallmasks.eval.results import read_json
    from tallmasks.storage.collection import is_collection, looks_like_collection

    files: list[Path] = []
    named: set[Path] = set()
    collections: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise TallmasksError(f"{path}: no such results file or folder")
        if path.is_file():
            files.append(path)
            named.add(path)
            continue
        if looks_like_collection(path):  # named by the user: read, and refused in one line when damaged
            collections.append(path)
        for meta in sorted(path.rglob("meta.json")):
            if is_collection(meta.parent) and meta.parent not in collections:
                collections.append(meta.parent)
        files += sorted(p for p in path.rglob("*.json") if not p.name.endswith(".journal.json") and p.name != "meta.json")
    found: dict[tuple, tuple[tuple, Run]] = {}
    for file in files:
        try:
            data = read_json(file)
        except TallmasksError as exc:
            if file in named:  # a file the user named is refused; one found in a folder may be anything
                raise
            log.warning("skipped %s", exc)
            continue
        kind = checked_results(data, file)  # a malformed results file is refused, not skipped
        if kind is None:
            continue
        run = run_from_results(data, str(file)) if kind == "results" else None
        runs = [run] if run is not None else runs_from_demo_summary(data, str(file)) if kind == "summary" else []
        for r in runs:
            key = (r.model, r.datasets, r.method)
            rank = (bool(r.val), file.stat().st_mtime)  # a runner's file (with its validation curve) first
            if key not in found or found[key][0] <= rank:
                found[key] = (rank, r)
    return [r for _, r in found.values()], collections


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, tuple[str, ...]], dict[str, Run]]:
    """{(model, datasets): {method key: run}}, models and task counts sorted."""
    groups: dict[tuple[str, tuple[str, ...]], dict[str, Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.datasets), {})[run.method] = run
    return dict(sorted(groups.items(), key=lambda item: (item[0][0], len(item[0][1]), item[0][1])))


# ---------------------------------------------------------------------------------------------
# the paper's data


def _data_lines(name: str) -> list[str]:
    text = resources.files("tallmasks").joinpath("data", "paper", name).read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@cache
def paper_table() -> dict[tuple[str, int, str], dict[str, Any]]:
    """(model, num_tasks, method) -> {"accuracy", "normalized", "storage_gb"} of the paper's main vision table."""
    out = {}
    for row in csv.DictReader(_data_lines("table_vision.csv")):

        def number(text: str) -> float | None:
            return float(text.lstrip(">")) if text else None

        out[(row["model"], int(row["num_tasks"]), row["method"])] = {
            "accuracy": number(row["accuracy"]),
            "normalized": number(row["normalized"]),
            "storage_gb": row["storage_gb"] or None,
        }
    return out


@cache
def paper_per_dataset() -> dict[tuple[str, int, str], dict[str, float]]:
    """(model, num_tasks, our method key) -> {dataset: test accuracy (fraction)}, another group's runs."""
    out: dict[tuple[str, int, str], dict[str, float]] = {}
    for row in csv.DictReader(_data_lines("per_dataset_tsv_runs.csv")):
        key = (row["model"], int(row["num_tasks"]), PER_DATASET_METHODS.get(row["method"], row["method"]))
        out.setdefault(key, {})[row["dataset"]] = float(row["test_accuracy"])
    return out


@cache
def leaky_denominators() -> dict[str, dict[str, float]]:
    """model -> {dataset: fine-tuned test accuracy} as the paper normalized (the leaky DTD split)."""
    return json.loads(resources.files("tallmasks").joinpath("data", "paper", "finetuned_test_accuracies_leaky_dtd.json").read_text())


def _paper_group(model: str, datasets: Sequence[str]) -> int | None:
    """The paper's task count when ``datasets`` is its first 8/14/20, else None."""
    from tallmasks.datasets import ALL_DATASETS

    n = len(datasets)
    return n if n in TASK_COUNTS and list(datasets) == list(ALL_DATASETS[:n]) else None


# ---------------------------------------------------------------------------------------------
# tables


MAIN_HEADERS = [
    "method",
    "accuracy",
    "paper",
    "diff",
    "normalized",
    "normalized, paper's denominators",
    "paper normalized",
    "diff (paper's denominators)",
]


def main_rows(model: str, datasets: Sequence[str], runs: Mapping[str, Run]) -> list[list[Any]]:
    """Rows of the paper-shaped table for one model and task list: every method run, the fine-tuned
    row, and the paper's rows that have no run here (marked not run)."""
    n = _paper_group(model, datasets)
    paper = paper_table()
    leaky = leaky_denominators().get(model)
    keys = list(runs)
    if any(r.finetuned for r in runs.values()):
        keys.append("finetuned")
    if n is not None:
        keys += [m for (pm, pn, m) in paper if pm == model and pn == n]
    rows = []
    for key in method_order(keys):
        ref = paper.get((model, n, key), {}) if n is not None else {}
        if key == "finetuned":
            any_run = next(iter(runs.values()))
            acc = (
                pct(sum(any_run.finetuned[d] for d in datasets) / len(datasets)) if all(d in any_run.finetuned for d in datasets) else None
            )
            norm = 100.0 if acc is not None else None
            norm_leaky = pct(sum(any_run.finetuned[d] / leaky[d] for d in datasets) / len(datasets)) if leaky and acc is not None else None
        elif key in runs:
            run = runs[key]
            acc, norm = pct(run.avg_top1), pct(run.normalized())
            norm_leaky = pct(run.normalized(leaky)) if leaky else None
        else:
            acc = norm = norm_leaky = None
        label = method_label(key) + ("" if key in runs or key == "finetuned" else " (not run)")
        rows.append(
            [
                label,
                acc,
                ref.get("accuracy"),
                diff(acc, ref.get("accuracy")),
                norm,
                norm_leaky,
                ref.get("normalized"),
                diff(norm_leaky, ref.get("normalized")),
            ]
        )
    return rows


def per_dataset_rows(model: str, datasets: Sequence[str], runs: Mapping[str, Run]) -> tuple[list[str], list[list[Any]]]:
    """Per-dataset test accuracy of every run, with the other group's runs beside where they exist."""
    headers = ["method", *datasets, "avg"]
    others = paper_per_dataset()
    n = _paper_group(model, datasets)
    rows = []
    for key in method_order(runs):
        run = runs[key]
        rows.append([method_label(key)] + [pct(run.top1[d]) for d in datasets] + [pct(run.avg_top1)])
        theirs = others.get((model, n, key)) if n is not None else None
        if theirs:
            values = [pct(theirs.get(d)) for d in datasets]
            avg = sum(values) / len(values) if all(v is not None for v in values) else None
            rows.append([f"{method_label(key)}, TSV authors' runs (older checkpoints)"] + values + [avg])
    any_run = next(iter(runs.values()))
    if all(d in any_run.finetuned for d in datasets):
        values = [pct(any_run.finetuned[d]) for d in datasets]
        rows.append(["Fine-tuned (denominators)"] + values + [sum(values) / len(values)])
    return headers, rows


def format_result(results: Mapping[str, Any], fmt: str = "text") -> str:
    """One run as a small table (main.py's end-of-run summary): per task absolute and normalized test accuracy."""
    datasets = list(results.get("datasets", []))
    test = results.get("test", {})
    rows = [[d, pct(test.get(f"{d}:top1")), pct(test.get(f"{d}:normalized_top1"))] for d in datasets]
    rows.append(["average", pct(test.get("avg_top1")), pct(test.get("avg_normalized_top1"))])
    method = results.get("method", {})
    title = f"{results.get('model')} | {method_key(method, results) if 'name' in method else method.get('name')} | {len(datasets)} tasks | {results.get('selection', {})}"
    text = title + "\n" + render_table(["task", "top1", "normalized"], rows, fmt)
    if results.get("results_path"):
        text += f"\nsaved to {results['results_path']}"
    return text


def method_table(
    rows: Mapping[str, Mapping[str, Any]], datasets: Sequence[str] | None = None, normalized: bool = False, fmt: str = "markdown"
) -> str:
    """One row per method (name -> runner results dict), one column per task, then the average."""
    if datasets is None:
        datasets = []
        for res in rows.values():
            datasets += [d for d in res.get("datasets", []) if d not in datasets]
    metric = "normalized_top1" if normalized else "top1"
    body = [
        [name] + [pct(res.get("test", {}).get(f"{d}:{metric}")) for d in datasets] + [pct(res.get("test", {}).get(f"avg_{metric}"))]
        for name, res in rows.items()
    ]
    return render_table(["method", *datasets, "avg"], body, fmt)


def summary_table(summary: Mapping[str, Any], tasks: Sequence[str], fmt: str = "text") -> str:
    """The demo's method x task table (test accuracy, %), average and normalized average."""
    rows = []
    for name, entry in summary["methods"].items():
        rows.append(
            [name] + [pct(entry["per_task"][t]["top1"]) for t in tasks] + [pct(entry["avg_top1"]), pct(entry["avg_normalized_top1"])]
        )
    return render_table(["method", *tasks, "avg", "normalized"], rows, fmt)


# ---------------------------------------------------------------------------------------------
# storage


STORAGE_HEADERS = [
    "model",
    "tasks",
    "masks",
    "storage",
    "fine-tuned checkpoints (MB)",
    "theta_0 (MB)",
    "paper's scheme (MB)",
    "ours (MB)",
    "ours / paper's scheme",
    "ours / fine-tuned",
    "beyond theta_0: ours / paper's",
    "masks (bits/weight/task)",
    "accuracy retained (%)",
    "paper's table (Gb): fine-tuned -> TALL",
]


def storage_rows(collections: Sequence[Path], runs: Sequence[Run]) -> list[list[Any]]:
    """One row per compressed collection, from its files: theta_0 counted in the paper's scheme and in ours."""
    from tallmasks.storage.collection import collection_report, read_meta

    rows = []
    for folder in collections:
        report = collection_report(folder)
        meta = read_meta(folder)
        tasks = report["tasks"]
        finetuned = [Path(p) for p in meta.get("finetuned", [])]
        ft_bytes = sum(p.stat().st_size for p in finetuned) if finetuned and all(p.is_file() for p in finetuned) else None
        theta0 = Path(meta["pretrained"]["path"])
        theta0_bytes = theta0.stat().st_size if theta0.is_file() else None
        paper_total = theta0_bytes + report["paper_bytes"] if theta0_bytes is not None else None
        ours_total = theta0_bytes + report["total_bytes"] if theta0_bytes is not None else None
        use_ties = bool((report["masks"] or {}).get("use_ties"))
        values = report.get("values") or {}
        found = _retained(runs, tasks, use_ties, report.get("model"))
        # a run's accuracy is that of exact values: it is not shown for a lossy collection
        retained = None if values.get("lossy") else found
        model = report.get("model") or (found.model if found else None)
        n = _paper_group(model or "", tasks)
        paper_ft = paper_table().get((model, n, "finetuned"), {}).get("storage_gb")
        paper_tall = paper_table().get((model, n, "tall_mask"), {}).get("storage_gb")
        rows.append(
            [
                model or "?",
                len(tasks),
                (report["masks"] or {}).get("kind", "?") + (" (TIES)" if use_ties else ""),
                report["storage"] + (f" ({values.get('setting')}, lossy)" if values.get("lossy") else ""),
                _mb(ft_bytes),
                _mb(theta0_bytes),
                _mb(paper_total),
                _mb(ours_total),
                _ratio(ours_total, paper_total),
                _ratio(ours_total, ft_bytes),
                f"{report['ratio_to_paper']:.3f}",
                f"{report['mask_bits_per_weight_per_task']:.3f}",
                pct(retained.normalized()) if retained else None,
                f"{paper_ft} -> {paper_tall}" if paper_ft and paper_tall else None,
            ]
        )
    return rows


def _retained(runs: Sequence[Run], tasks: Sequence[str], use_ties: bool, model: str | None) -> Run | None:
    key = "tall_mask_ties" if use_ties else "tall_mask"
    for run in runs:
        if list(run.datasets) == list(tasks) and run.method.partition(" (")[0] == key and (model is None or run.model == model):
            return run
    return None


def _mb(value: int | None) -> str | None:
    return None if value is None else f"{value / 1e6:.2f}"


def _ratio(a: float | None, b: float | None) -> str | None:
    return None if a is None or not b else f"{a / b:.3f}"


# ---------------------------------------------------------------------------------------------
# figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from tallmasks.io.checkpoints import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)
    return path


def _agreement(run: Run | None) -> list[int] | None:
    if run is None:
        return None
    if run.agreement:
        return run.agreement
    if run.mask_path and Path(run.mask_path).is_file():
        from tallmasks.masks import MaskSet

        return MaskSet.load(run.mask_path).agreement()
    return None


def plot_agreement_pair(runs: Mapping[str, Run], title: str, path: Path) -> Path | None:
    """Mask agreement profile of the TA-based and the TIES-based TALL masks, side by side (share of weights)."""
    profiles = {
        label: _agreement(runs.get(key)) for key, label in (("tall_mask", "TALL masks on TA"), ("tall_mask_ties", "TALL masks on TIES"))
    }
    profiles = {k: v for k, v in profiles.items() if v}
    if not profiles:
        return None
    from tallmasks.report.plots import draw_agreement

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.2 * len(profiles), 3.4), sharey=True, squeeze=False)
    for ax, (label, profile) in zip(axes[0], profiles.items()):
        draw_agreement(ax, profile, label)
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_consensus_threshold(runs: Mapping[str, Run], title: str, path: Path) -> Path | None:
    """Test accuracy (normalized) against the consensus threshold k, for TA and TIES bases."""
    series: dict[str, list[tuple[int, float]]] = {}
    for run in runs.values():
        if run.params.get("name") != "consensus" or run.normalized() is None:
            continue
        label = "Consensus TIES" if run.params.get("use_ties") else "Consensus TA"
        k = int(run.params.get("prun_thre_k", 2))
        series.setdefault(label, []).append((k, pct(run.normalized())))
    series = {k: sorted(v) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for key, label, style in (("sum", "Task Arithmetic (k = 0)", "--"), ("ties", "TIES", ":")):
        if key in runs and runs[key].normalized() is not None:
            ax.axhline(pct(runs[key].normalized()), linestyle=style, color="grey", label=label)
    ax.set_xlabel("consensus threshold k (weights kept by at least k task masks)")
    ax.set_ylabel("normalized test accuracy (%)")
    ax.set_xticks(sorted({p[0] for points in series.values() for p in points}))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_tasks_scaling(model: str, groups: Mapping[tuple[str, tuple[str, ...]], Mapping[str, Run]], path: Path) -> Path | None:
    """Normalized test accuracy against the number of tasks, one line per method; the paper's dashed."""
    series: dict[str, list[tuple[int, float]]] = {}
    for (m, datasets), runs in groups.items():
        if m != model:
            continue
        for key, run in runs.items():
            if run.normalized() is not None:
                series.setdefault(key, []).append((len(datasets), pct(run.normalized())))
    series = {k: sorted(v) for k, v in series.items() if len(v) > 1}
    paper = {}
    for (pm, n, key), values in paper_table().items():
        if pm == model and values.get("normalized") is not None:
            paper.setdefault(key, []).append((n, values["normalized"]))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(method_order(series)):
        color = colors[i % len(colors)]
        points = series[key]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=method_label(key))
        if key in paper:
            points = sorted(paper[key])
            ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="--", marker="x", color=color, alpha=0.6)
    ax.set_xlabel("number of tasks")
    ax.set_ylabel("normalized test accuracy (%)")
    ax.set_xticks(sorted({p[0] for points in series.values() for p in points}))
    ax.set_title(f"{model}: ours (solid) and the paper's table (dashed, leaky-DTD denominators)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_validation_curves(runs: Mapping[str, Run], title: str, path: Path, metric: str = "avg_normalized_top1") -> Path | None:
    """Validation accuracy against alpha (merging methods) and against lambda (TALL masks), chosen points marked."""
    curves = {"alpha": {}, "lambda": {}}
    for key, run in runs.items():
        try:
            points = sorted((float(c), pct(float(m[metric]))) for c, m in run.val.items())
        except (TypeError, ValueError, KeyError):
            continue
        if len(points) > 1:
            curves["lambda" if run.params.get("name") == "tall_mask" else "alpha"][key] = points
    panels = [(name, c) for name, c in curves.items() if c]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6), squeeze=False)
    for ax, (coefficient, series) in zip(axes[0], panels):
        for key in method_order(series):
            points = series[key]
            line = ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=method_label(key))[0]
            chosen = runs[key].selection.get("alpha")
            if coefficient == "alpha" and chosen is not None:
                best = [p for p in points if abs(p[0] - float(chosen)) < 1e-9]
                if best:
                    ax.plot(best[0][0], best[0][1], marker="*", markersize=12, color=line.get_color())
        ax.set_xlabel("alpha (scaling of the merged vector)" if coefficient == "alpha" else "lambda (same for every task)")
        ax.set_ylabel("normalized validation accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(title + ("  (star: alpha chosen)" if curves["alpha"] else ""), fontsize=10)
    return _save(fig, path)


def plot_alpha_curves(results: Mapping[str, Mapping[str, Any]], path: str | Path, metric: str = "avg_normalized_top1") -> Path:
    """Validation ``metric`` against alpha for runner results dicts (name -> results); saved as PNG."""
    runs = {name: r for name, res in results.items() if (r := run_from_results(res)) is not None}
    return plot_validation_curves(runs, "validation curves", Path(path), metric) or Path(path)


def load_results(paths: Sequence[str | Path]) -> dict[str, dict]:
    """Results files by file stem."""
    from tallmasks.eval.results import read_json

    return {Path(p).stem: read_json(p) for p in paths}


# ---------------------------------------------------------------------------------------------
# the report


NOTES = """Normalized accuracy is the average over tasks of test accuracy / fine-tuned test accuracy. Two
denominators are shown: **normalized** uses each run's own fine-tuned accuracies (the project's shipped,
corrected values for the paper's models); **paper's denominators** uses the fine-tuned accuracies behind the
paper's table, with the leaky DTD test split (DTD 0.9798 for ViT-B-32). The paper's normalized column is
comparable only with the second. The hub's checkpoints and masks were re-released in Dec 2024: runs of
today's files are not the runs behind the paper's table. `n/a`: no number (the paper has no ViT-B-16 table,
and only the paper's models have its denominators); `(not run)`: a row of the paper with no run here."""


def write_report(paths: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Markdown, CSV and PNG reports of every run and collection under ``paths``; returns what was written."""
    from tallmasks.core.errors import TallmasksError
    from tallmasks.io.guard import check_output

    check_output(out_dir, paths, folder=True, label="--out")
    runs, collections = collect(paths)
    if not runs and not collections:
        raise TallmasksError(f"no results or compressed collections found under {', '.join(map(str, paths))}")
    storage = storage_rows(collections, runs)  # every collection read (and checked) before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    md = ["# Reproduction report", "", NOTES, ""]
    main_csv, per_csv, figures = [], [], []
    for (model, datasets), group in groups.items():
        n = len(datasets)
        tag = f"{model}_{n}tasks" + ("" if _paper_group(model, datasets) or model not in leaky_denominators() else "_custom")
        md += [
            f"## {md_escape(model)}, {n} tasks",
            "",
            "Tasks: " + md_escape(", ".join(datasets)),
            "",
            "Average test accuracy (%), ours beside the paper's table:",
            "",
            render_table(MAIN_HEADERS, main_rows(model, datasets, group)),
            "",
        ]
        main_csv += [[model, n, *row] for row in main_rows(model, datasets, group)]
        headers, rows = per_dataset_rows(model, datasets, group)
        md += ["Per-dataset test accuracy (%):", "", render_table(headers, rows), ""]
        per_csv += [[model, n, row[0], column, value] for row in rows for column, value in zip(headers[1:], row[1:])]
        for maker, name in (
            (plot_agreement_pair, "agreement"),
            (plot_consensus_threshold, "consensus_threshold"),
            (plot_validation_curves, "validation"),
        ):
            figure = maker(group, f"{model}, {n} tasks", out / f"{name}_{tag}.png")
            if figure is not None:
                figures.append(figure)
                md += [f"![{name}]({figure.name})", ""]
    for model in sorted({m for m, _ in groups}):
        figure = plot_tasks_scaling(model, groups, out / f"tasks_{model}.png")
        if figure is not None:
            figures.append(figure)
            md += [f"## {md_escape(model)}: normalized accuracy against the number of tasks", "", f"![tasks]({figure.name})", ""]
    if storage:
        md += [
            "## Storage",
            "",
            "From the compressed collections' files; theta_0 counted in both schemes (the paper counts it as the "
            "whole CLIP). Paper's scheme: theta_0 + float32 merged vector + 1 bit per weight per task.",
            "",
            render_table(STORAGE_HEADERS, storage),
            "",
        ]
    written = {"markdown": out / "report.md", "csv": [out / "main_table.csv", out / "per_dataset.csv"], "figures": figures}
    _write_text(out / "report.md", "\n".join(md) + "\n")
    _write_text(out / "main_table.csv", render_table(["model", "tasks", *MAIN_HEADERS], main_csv, "csv"))
    _write_text(out / "per_dataset.csv", render_table(["model", "tasks", "method", "dataset", "test accuracy (%)"], per_csv, "csv"))
    if storage:
        _write_text(out / "storage.csv", render_table(STORAGE_HEADERS, storage, "csv"))
        written["csv"].append(out / "storage.csv")
    return written


def _write_text(path: Path, text: str) -> None:
    from tallmasks.io.checkpoints import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
