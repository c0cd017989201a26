"""Zero-shot or fine-tuned single-task accuracies (val and test), merged into
results/single_task/<model>/{zeroshot,nonlinear_ft}_accuracies.json.

    python eval_single_task.py --model=ViT-B-32 --finetuning-mode=standard
    python eval_single_task.py --model=ViT-B-32 --finetuning-mode=none --datasets MNIST Cars
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import tallmasks  # noqa: F401
except ImportError:  # running from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def parse_args(argv=None) -> argparse.Namespace:
    from tallmasks.core.precision import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument(
        "--finetuning-mode",
        choices=["none", "standard"],
        default="standard",
        help="none: the zero-shot model; standard: each dataset's fine-tuned model",
    )
    p.add_argument("--datasets", nargs="+", default=None, help="dataset names (default: all 20)")
    p.add_argument("--model-location", default="models/checkpoints")
    p.add_argument("--data-location", default="~/data")
    p.add_argument("--output-dir", default="results/single_task", help="tables go to <output-dir>/<model>/")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="see docs/performance.md, Evaluation")
    p.add_argument("--cache-dir", default=None, help="preprocessed splits (default <data-location>/.tallmasks_cache)")
    p.add_argument("--num-workers", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from tallmasks.core.errors import TallmasksError
    from tallmasks.eval.single_task import evaluate_single_task

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    datasets = [n for part in args.datasets for n in part.split(",") if n] if args.datasets else None
    try:
        evaluate_single_task(
            args.model,
            args.finetuning_mode,
            datasets,
            args.model_location,
            args.data_location,
            args.output_dir,
            args.batch_size,
            args.device,
            args.precision,
            args.cache_dir,
            args.num_workers,
        )
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
