"""Results files (atomic JSON) and the resume journal of finished evaluations."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tallmasks.core.errors import TallmasksError
from tallmasks.io.checkpoints import atomic_path
from tallmasks.io.guard import require_file


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file and a rename; parents are created."""
    path = Path(path)
    text = json.dumps(_jsonable(data), indent=4) + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path


def read_json(path: str | Path, schema: Any = None) -> Any:
    """Parsed JSON of ``path`` (checked against ``schema`` when given, a ``tallmasks.core.schema`` part); a
    corrupt, too large, too deeply nested or wrongly shaped file raises a one-line TallmasksError."""
    from tallmasks.core.schema import read_json as read_checked

    return read_checked(require_file(path, "JSON", TallmasksError), TallmasksError, schema)


def file_signature(path: str | Path) -> list:
    """[resolved path, size, mtime in ns] of a file: what tells a replaced file from the one recorded."""
    path = Path(path)
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _valid_entry(entry: Any) -> bool:
    """A journal entry is two integer counts with 0 <= correct <= total and total > 0."""
    if not isinstance(entry, Mapping):
        return False
    correct, total = entry.get("correct"), entry.get("total")
    counts = all(isinstance(v, int) and not isinstance(v, bool) for v in (correct, total))
    return counts and 0 <= correct <= total and total > 0


class Journal:
    """Finished evaluations of one run: key (setting, dataset, split) -> correct and total counts.

    Stored as a small JSON file next to the results; a journal written for another run (different
    ``run_key``: settings, inputs by size and mtime, the splits' cache identities) is ignored, and so is
    an entry that is not a valid count. Only the writer (rank 0) saves it.
    """

    def __init__(self, path: str | Path, run_key: Mapping[str, Any], writer: bool = True):
        self.path = Path(path)
        self.run_key = json.loads(json.dumps(_jsonable(run_key), sort_keys=True))
        self.writer = writer
        self.entries: dict[str, dict[str, int]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (ValueError, OSError):
                data = None
            if isinstance(data, dict) and data.get("run_key") == self.run_key and isinstance(data.get("entries"), dict):
                self.entries = {str(k): dict(v) for k, v in data["entries"].items() if _valid_entry(v)}

    @staticmethod
    def key(setting: str, dataset: str, split: str) -> str:
        return f"{setting}|{dataset}|{split}"

    def get(self, setting: str, dataset: str, split: str) -> dict[str, int] | None:
        return self.entries.get(self.key(setting, dataset, split))

    def record(self, setting: str, dataset: str, split: str, correct: int, total: int) -> None:
        self.entries[self.key(setting, dataset, split)] = {"correct": int(correct), "total": int(total)}
        if self.writer:
            atomic_write_json(self.path, {"run_key": self.run_key, "entries": self.entries})

    def __len__(self) -> int:
        return len(self.entries)
