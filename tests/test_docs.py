"""The docs stay true to the code: the commands they show parse, every method is documented, and the
README stays a front door."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tallmasks.cli import build_parser
from tallmasks.merging import METHODS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code_lines(path: Path) -> list[str]:
    """Lines of the page's fenced code blocks, continuation lines joined."""
    lines, inside, pending = [], False, ""
    for raw in path.read_text().splitlines():
        if raw.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def _commands(prefix: str) -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for line in _code_lines(page):
            if line.startswith(prefix + " "):
                out.append((page.name, line.split("  #")[0].split(" # ")[0].strip()))
    return out


TALLMASKS_COMMANDS = _commands("tallmasks")


def test_the_pages_show_tallmasks_commands():
    verbs = {shlex.split(command)[1] for _, command in TALLMASKS_COMMANDS}
    assert {"merge", "compress", "decompress", "inspect", "report", "align", "convert", "prepare-data"} <= verbs


@pytest.mark.parametrize("page, command", TALLMASKS_COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in TALLMASKS_COMMANDS])
def test_every_documented_tallmasks_command_parses(page, command):
    if re.search(r"\{[^}]*,|\[|\.\.\.|\$", command):
        pytest.skip("a usage synopsis (alternatives, optional parts) or a shell variable, not a literal command")
    args = shlex.split(command)[1:]
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:  # argparse's exit on a bad command line
        raise AssertionError(f"{page}: `{command}` does not parse") from exc


def test_every_registered_method_is_documented():
    text = (REPO / "docs" / "methods.md").read_text()
    missing = [name for name in METHODS if f"`{name}`" not in text]
    assert missing == []


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_every_docs_page_is_in_the_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []


MAIN_COMMANDS = [(page, command) for page, command in _commands("python main.py")]


def test_the_pages_show_main_py_commands():
    assert len(MAIN_COMMANDS) >= 10


@pytest.mark.parametrize("page, command", MAIN_COMMANDS, ids=[f"{p}:{c[15:75]}" for p, c in MAIN_COMMANDS])
def test_every_documented_main_py_command_validates(page, command):
    """Each override line composes with Hydra and passes main.py's one validation layer (on this CPU)."""
    from hydra import compose, initialize_config_dir

    from tallmasks.experiments.config import validate_config

    overrides = shlex.split(command)[2:]
    if "-m" in overrides or any(o.startswith("method={") for o in overrides):
        pytest.skip("a sweep over methods (Hydra multirun or shell braces), one run per value")
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "device=cpu", "force_world_size=true"])
    validate_config(cfg)
