"""Evaluation: cached preprocessing, in-place weight updates, distributed sharding, alpha/lambda
selection, results with resume, and the experiment runner behind ``main.py``."""

from tallmasks.eval.cache import SplitData, cache_path, load_or_build_split
from tallmasks.eval.distributed import DistInfo, init_distributed
from tallmasks.eval.evaluator import Evaluator, precision_context
from tallmasks.eval.results import Journal, atomic_write_json, read_json
from tallmasks.eval.selection import (
    average_normalized,
    finetuned_accuracies,
    normalized_accuracy,
    select_alpha,
    select_lambdas,
)

__all__ = [
    "DistInfo",
    "Evaluator",
    "Journal",
    "SplitData",
    "atomic_write_json",
    "average_normalized",
    "cache_path",
    "finetuned_accuracies",
    "init_distributed",
    "load_or_build_split",
    "normalized_accuracy",
    "precision_context",
    "read_json",
    "select_alpha",
    "select_lambdas",
]
