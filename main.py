"""Merge fine-tuned checkpoints, choose the coefficient on validation, evaluate on test, record.

    python main.py model=ViT-B-32 method=sum
    python main.py model=ViT-B-32 method=tall_mask method.use_ties=true
    torchrun --nproc_per_node=4 main.py model=ViT-L-14 method=ties
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    import tallmasks  # noqa: F401
except ImportError:  # running from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="config", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from tallmasks.errors import TallmasksError
    from tallmasks.eval.runner import run_experiment
    from tallmasks.reporting import format_result

    try:
        results = run_experiment(cfg)
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if results.get("rank", 0) == 0:
        logging.getLogger("tallmasks").info("\n%s", format_result(results))


if __name__ == "__main__":
    main()
