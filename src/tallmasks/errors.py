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
