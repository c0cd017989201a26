"""Merge fine-tuned checkpoints, choose the coefficient on validation, evaluate on test, record.

python main.py model=ViT-B-32 method=sum
python main.py model=ViT-B-32 method=tall_mask method.use_ties=true
torchrun --nproc_per_node=4 main.py model=ViT-L-14 method=ties
python main.py model=ViT-L-14 method=ties world_size=4       # the same, ranks spawned here
"""

from __future__ import annotations

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
    from tallmasks.experiments.runner import run_main

    code = run_main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
