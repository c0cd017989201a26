"""Hostile results files given to ``tallmasks report``: names that would leave --out, markdown and HTML in
names, absurd denominators, duplicates and malformed structure. Each is refused in one line naming the file
and the place (nothing written), or rendered as inert text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tallmasks.cli import main
from tallmasks.report.tables import md_escape, render_table

TASKS = ["MNIST", "Cars"]


def results(model="tiny", datasets=TASKS, method=None, top1=0.6, finetuned=0.9, **extra) -> dict:
    return {
        "model": model,
        "method": method or {"name": "sum", "k": 100},
        "datasets": list(datasets),
        "finetuned_accuracies": dict.fromkeys(datasets, finetuned),
        "test": {f"{d}:top1": top1 for d in datasets},
        "val": {},
        **extra,
    }


def summary(tasks=TASKS, **methods) -> dict:
    entry = {"per_task": {t: {"top1": 0.5} for t in tasks}}
    return {
        "model": "tiny",
        "tasks": list(tasks),
        "methods": {"finetuned": {"per_task": {t: {"top1": 0.9} for t in tasks}}, "sum": entry, **methods},
    }


def refused(tmp_path: Path, capsys, data, named: bool = False) -> str:
    """``report`` of a folder holding one JSON file of ``data`` (or of the file itself when ``named``): the
    one error line; no --out folder made."""
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    (folder / "r.json").write_text(data if isinstance(data, str) else json.dumps(data))
    source = folder / "r.json" if named else folder
    assert main(["-q", "report", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "r.json" in err[0], err
    assert not (tmp_path / "out").exists()
    return err[0]


@pytest.mark.parametrize("model", ["q/../../../victim/figure", "../x", "..", ".hidden", "a\\b", "a\nb", "x" * 300, ""])
def test_a_model_name_that_is_not_a_file_name_is_refused(tmp_path, capsys, model):
    line = refused(tmp_path, capsys, results(model=model))
    assert "model" in line and "cannot name a file" in line or "not a plain file name" in line
    assert not (tmp_path / "victim").exists() and not list(tmp_path.rglob("*.png"))


def test_task_and_method_names_are_checked_too(tmp_path, capsys):
    assert "datasets[1]" in refused(tmp_path, capsys, results(datasets=["MNIST", "../../etc"]))
    assert "method.name" in refused(tmp_path, capsys, results(method={"name": "a/b"}))
    assert "methods.a/b" in refused(tmp_path, capsys, summary(**{"a/b": {"per_task": {t: {"top1": 0.5} for t in TASKS}}}))


def test_markdown_and_html_in_names_stay_text(tmp_path, capsys):
    tasks = ["MNIST|x", "<img src=x onerror=alert(1)>", "a&b"]
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "r.json").write_text(json.dumps(results(model="m<b>|", datasets=tasks)))
    assert main(["-q", "report", str(folder), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "<img" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "m&lt;b&gt;\\|" in text and "MNIST\\|x" in text and "a&amp;b" in text
    table = next(line for line in text.splitlines() if line.startswith("| method |") and "MNIST" in line)
    assert table.count(" | ") == len(tasks) + 1  # the pipe inside a name does not add a column


def test_md_escape():
    assert md_escape("a|b") == "a\\|b"
    assert md_escape("line\n# heading") == "line # heading"
    assert md_escape("<i>&") == "&lt;i&gt;&amp;"
    assert render_table(["h|"], [["x|y"]]).splitlines() == ["| h\\| |", "|---|", "| x\\|y |"]


@pytest.mark.parametrize("value", [1e-300, 0, -0.5, 1.5, "0.9", None])
def test_absurd_denominators_are_refused(tmp_path, capsys, value):
    data = results()
    data["finetuned_accuracies"]["Cars"] = value
    assert "finetuned_accuracies.Cars" in refused(tmp_path, capsys, data)


def test_a_summary_with_an_absurd_fine_tuned_accuracy_is_refused(tmp_path, capsys):
    data = summary()
    data["methods"]["finetuned"]["per_task"]["Cars"]["top1"] = 1e-300
    assert "methods.finetuned.per_task.Cars.top1" in refused(tmp_path, capsys, data)


def test_duplicate_datasets_are_refused(tmp_path, capsys):
    assert "appears twice" in refused(tmp_path, capsys, results(datasets=["MNIST", "Cars", "MNIST"]))
    assert "appears twice" in refused(tmp_path, capsys, summary(tasks=["MNIST", "MNIST"]))


@pytest.mark.parametrize(
    "edit, place",
    [
        (lambda d: d["methods"]["sum"]["per_task"].pop("Cars"), "methods.sum: per_task.Cars: missing"),
        (lambda d: d["methods"]["sum"]["per_task"]["Cars"].update(top1="high"), "top1"),
        (lambda d: d["methods"].update(sum=[1, 2]), "methods.sum"),
        (lambda d: d.update(tasks=[1, 2]), "tasks[0]"),
        (lambda d: d.update(mask_agreement={"weights": ["a"]}), "mask_agreement.weights[0]"),
        (lambda d: d["methods"].pop("finetuned"), "finetuned"),
    ],
)
def test_malformed_summaries_are_one_line(tmp_path, capsys, edit, place):
    data = summary()
    edit(data)
    assert place in refused(tmp_path, capsys, data)


@pytest.mark.parametrize(
    "edit, place",
    [
        (lambda d: d["test"].update({"Cars:top1": "x"}), "test: Cars:top1"),
        (lambda d: d["test"].pop("Cars:top1"), "Cars:top1: missing"),
        (lambda d: d.update(method=[1]), "method"),
        (lambda d: d["method"].update(prun_thre_k="two"), "method.prun_thre_k"),
        (lambda d: d.update(agreement=[1, "a"]), "agreement[1]"),
        (lambda d: d.update(val={"high": {}}), "val.high"),
        (lambda d: d.update(datasets="MNIST"), "datasets"),
    ],
)
def test_malformed_results_are_one_line(tmp_path, capsys, edit, place):
    data = results()
    edit(data)
    assert place in refused(tmp_path, capsys, data)


def test_deeply_nested_results_are_one_line(tmp_path, capsys):
    deep = '{"method": {"name": "sum"}, "test": {}, "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
    assert "nested too deeply" in refused(tmp_path, capsys, deep, named=True)


def test_other_json_files_are_skipped(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "r.json").write_text(json.dumps(results()))
    (folder / "other.json").write_text(json.dumps({"anything": [1, 2]}))
    assert main(["-q", "report", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").exists()
