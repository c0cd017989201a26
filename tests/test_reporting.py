"""Reports: the one table renderer, method names, the paper-shaped table under both denominators,
per-dataset tables beside the other group's runs, figures and the storage table from real collections."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run_cli

from tallmasks.datasets import ALL_DATASETS
from tallmasks.eval.results import atomic_write_json
from tallmasks.report import tables as reporting
from tallmasks.report.tables import (
    leaky_denominators,
    main_rows,
    method_key,
    paper_per_dataset,
    paper_table,
    per_dataset_rows,
    render_table,
    run_from_results,
)
from tallmasks.storage.collection import compress


def _results(model, datasets, method, top1, finetuned, val=None, **extra):
    test = {f"{d}:top1": top1[d] for d in datasets}
    test.update({f"{d}:normalized_top1": top1[d] / finetuned[d] for d in datasets})
    test["avg_top1"] = sum(top1.values()) / len(datasets)
    return {
        "model": model,
        "method": method,
        "datasets": list(datasets),
        "num_tasks": len(datasets),
        "precision": "fp32",
        "finetuned_accuracies": dict(finetuned),
        "test": test,
        "val": val or {},
        "selection": {"alpha": 0.3},
        **extra,
    }


def test_render_table_formats():
    rows = [["a", 12.345, None], ["bb", 1.0, "x"]]
    assert render_table(["m", "v", "w"], rows).splitlines()[2] == "| a | 12.3 | n/a |"
    text = render_table(["m", "v", "w"], rows, "text").splitlines()
    assert len({len(line) for line in text}) == 1  # aligned
    assert list(csv.reader(render_table(["m", "v", "w"], rows, "csv").splitlines()))[1] == ["a", "12.3", "n/a"]


def test_method_key_names_what_changed():
    assert method_key({"name": "sum", "k": 100, "full_name": "sum_k=100"}) == "sum"
    assert method_key({"name": "ties", "k": 20, "ties_agg": "mean"}) == "ties"
    assert method_key({"name": "consensus", "k": 100, "prun_thre_k": 2, "use_ties": True}) == "consensus_ties"
    assert method_key({"name": "consensus", "k": 100, "prun_thre_k": 3, "use_ties": False}) == "consensus (prun_thre_k=3)"
    assert method_key({"name": "tall_mask", "use_ties": False, "load_mask": True}) == "tall_mask (loaded masks)"
    assert method_key({"name": "sum", "k": 100}, {"precision": "bf16", "correction": {"name": "tact"}}) == "sum (tact, bf16)"
    assert method_key({"name": "brand_new", "rank": 4}) == "brand_new"  # methods the report does not know pass through


def test_main_table_beside_the_paper_under_both_denominators():
    datasets = ALL_DATASETS[:8]
    corrected = {d: 0.8 + 0.02 * i for i, d in enumerate(datasets)}
    top1 = {d: 0.5 + 0.03 * i for i, d in enumerate(datasets)}
    runs = {}
    for method in ({"name": "sum", "k": 100}, {"name": "new_method", "k": 100}):
        run = run_from_results(_results("ViT-B-32", datasets, method, top1, corrected))
        runs[run.method] = run
    rows = {row[0]: row for row in main_rows("ViT-B-32", datasets, runs)}
    leaky = leaky_denominators()["ViT-B-32"]
    ta = rows["Task Arithmetic"]
    assert ta[1] == pytest.approx(100 * sum(top1.values()) / 8)
    assert ta[2] == paper_table()[("ViT-B-32", 8, "sum")]["accuracy"]
    assert ta[3] == f"{ta[1] - ta[2]:+.1f}"
    assert ta[4] == pytest.approx(100 * sum(top1[d] / corrected[d] for d in datasets) / 8)
    assert ta[5] == pytest.approx(100 * sum(top1[d] / leaky[d] for d in datasets) / 8)
    assert ta[6] == paper_table()[("ViT-B-32", 8, "sum")]["normalized"]
    assert "new_method" in rows and "TIES (not run)" in rows
    assert list(rows).index("new_method") > list(rows).index("TALL mask + TIES (not run)")
    assert rows["Fine-tuned"][4] == 100.0
    b16 = {r[0]: r for r in main_rows("ViT-B-16", datasets, {"sum": runs["sum"]})}
    assert b16["Task Arithmetic"][2] is None and b16["Task Arithmetic"][6] is None and b16["Task Arithmetic"][5] is not None


def test_per_dataset_rows_beside_the_other_groups_runs():
    datasets = ALL_DATASETS[:8]
    ft = dict.fromkeys(datasets, 0.9)
    run = run_from_results(_results("ViT-B-32", datasets, {"name": "sum", "k": 100}, dict.fromkeys(datasets, 0.6), ft))
    headers, rows = per_dataset_rows("ViT-B-32", datasets, {"sum": run})
    theirs = next(r for r in rows if "TSV authors' runs" in r[0])
    expected = paper_per_dataset()[("ViT-B-32", 8, "sum")]
    assert theirs[1:-1] == pytest.approx([100 * expected[d] for d in datasets])
    assert headers == ["method", *datasets, "avg"]


def test_report_writes_tables_figures_and_storage(tmp_path, tiny_checkpoints):
    pt, fts, _ = tiny_checkpoints
    results = tmp_path / "results"
    names = ["MNIST", "Cars", "DTD"]
    ft = dict.fromkeys(names, 0.9)

    def val(peak):
        return {f"{a / 10:.6g}": {"avg_normalized_top1": 0.8 - (a / 10 - peak) ** 2} for a in range(1, 11)}

    for method, acc in (({"name": "sum", "k": 100}, 0.6), ({"name": "ties", "k": 20, "ties_agg": "mean"}, 0.65)):
        atomic_write_json(results / f"{method['name']}.json", _results("tiny", names, method, dict.fromkeys(names, acc), ft, val(0.3)))
    for k in range(4):
        for ties in (False, True):
            method = {"name": "consensus", "k": 100, "prun_thre_k": k, "use_ties": ties}
            atomic_write_json(
                results / f"cons_{k}_{ties}.json", _results("tiny", names, method, dict.fromkeys(names, 0.6 + 0.01 * k), ft, val(0.4))
            )
    for ties in (False, True):
        tall = _results(
            "tiny",
            names,
            {"name": "tall_mask", "k": 100, "use_ties": ties},
            dict.fromkeys(names, 0.88),
            ft,
            {f"{lam:.6g}": {"avg_normalized_top1": 0.9} for lam in (0.2, 0.4)},
            agreement=[5, 3, 2, 1],
        )
        atomic_write_json(results / f"tall_{ties}.json", tall)
    atomic_write_json(results / "sum.journal.json", {"run_key": {}, "entries": {}})  # journals are not results
    compress(pt, fts, tmp_path / "collections" / "coded", names=names, model="tiny")
    compress(pt, fts, tmp_path / "collections" / "packbits", names=names, model="tiny", storage="packbits")

    res = run_cli("report", results, tmp_path / "collections", "--out", tmp_path / "reports")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "reports"
    text = (out / "report.md").read_text()
    assert "Consensus TA (prun_thre_k=3)" in text and "TALL mask + TIES" in text and "n/a" in text
    for png in ("agreement_tiny_3tasks.png", "consensus_threshold_tiny_3tasks.png", "validation_tiny_3tasks.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
        assert png in text
    storage = list(csv.DictReader((out / "storage.csv").read_text().splitlines()))
    assert {row["storage"] for row in storage} == {"coded", "packbits"}
    coded = next(r for r in storage if r["storage"] == "coded")
    theta0 = pt.stat().st_size
    assert float(coded["theta_0 (MB)"]) == pytest.approx(theta0 / 1e6, abs=0.01)
    assert coded["accuracy retained (%)"] == f"{100 * 0.88 / 0.9:.1f}"
    main = list(csv.DictReader((out / "main_table.csv").read_text().splitlines()))
    assert {r["method"] for r in main} >= {"Task Arithmetic", "TIES", "Fine-tuned", "TALL mask + TA"}


def test_report_of_nothing_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli("report", tmp_path / "empty", "--out", tmp_path / "r")
    assert res.returncode == 2 and res.stderr.startswith("error: no results") and not (tmp_path / "r" / "report.md").exists()


def test_demo_summary_and_runner_results_give_the_same_run(tmp_path):
    names = ["A", "B"]
    summary = {
        "model": "m",
        "tasks": names,
        "methods": {
            "sum": {"per_task": {"A": {"top1": 0.5}, "B": {"top1": 0.7}}},
            "finetuned": {"per_task": {"A": {"top1": 0.8}, "B": {"top1": 0.9}}},
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    runs, _ = reporting.collect([tmp_path])
    assert len(runs) == 1 and runs[0].method == "sum"
    assert runs[0].normalized() == pytest.approx((0.5 / 0.8 + 0.7 / 0.9) / 2)
