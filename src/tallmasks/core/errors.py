"""User-facing errors: one line that names the culprit."""

from __future__ import annotations


class TallmasksError(Exception):
    """An error caused by bad input; entry points print its message alone and exit non-zero."""


class CheckpointError(TallmasksError):
    """A checkpoint is missing, unreadable, refused as unsafe, or inconsistent with the others."""


class ConfigError(TallmasksError):
    """A hyperparameter or option is out of range or unknown."""


class DatasetMissingError(TallmasksError):
    """A dataset is absent or needs manual preparation."""


class OutputError(TallmasksError):
    """An output cannot be written where asked: it is an input, the location is unwritable or full."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its non-empty lines joined), cut at a word boundary."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + " ..."
