"""Time of TACT calibration and of weight matching on a real open_clip architecture (random weights).

Calibration of one task, sequential in depth, three ways in the same run:
- ours: the ViT's blocks replayed on cached inputs (each block's sites measured on passes through that
  block alone; a block's own output measured on the pass that makes the next block's inputs);
- truncated: a forward pass from the images per site, stopped right after the site;
- naive: a whole forward pass from the images per site (what a hook-per-site loop does).
The three must give the same corrections (checked). Also: the expert-statistics pass, evaluation with
and without the correction hooks, and weight matching of two independently initialized image towers.

    python benchmarks/nonlocal_bench.py --model ViT-B-32 --images 32 --batch-size 16
    python benchmarks/nonlocal_bench.py --model ViT-B-32 --images 256 --device cuda --weight-matching
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, label: str = ""):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    if label:
        print(f"{label}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return result, seconds


class Report(dict):
    """The figures so far, rewritten to ``path`` after every one (a run cut short keeps what it measured)."""

    def __init__(self, path: str | None, **fields):
        super().__init__(**fields)
        self.path = Path(path) if path else None

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self, indent=1) + "\n")


def naive_calibrate(corrector, task, images, target, batch_size):
    """One whole forward pass per site, earlier sites corrected (the baseline)."""
    import torch

    from tallmasks.non_local.correction import Moments, SiteStats, solve

    correction = {}
    corrector.corrections[task] = correction
    device = corrector._device()
    with torch.no_grad(), corrector.use(task):
        for site in corrector.sites:
            moments = {site.name: Moments()}
            with corrector._recording(moments):
                for start in range(0, len(images), batch_size):
                    corrector.model(images[start : start + batch_size].to(device))
            correction[site.name] = solve(SiteStats.of(moments[site.name]), target[site.name])
    return correction


def main(argv=None) -> int:
    import open_clip
    import torch

    from tallmasks.models import register_demo_model
    from tallmasks.non_local import Corrector, load_weights, vit_spec, weight_matching

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-baselines", action="store_true", help="skip the truncated and naive calibrations")
    parser.add_argument("--weight-matching", action="store_true", help="also time weight matching of two random towers")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_demo_model()
    device = torch.device(args.device)

    def tower(seed):
        torch.manual_seed(seed)
        return open_clip.create_model(args.model, pretrained=None).visual.eval().to(device)

    expert, merged, model = tower(1), tower(2), tower(0)
    size = model.image_size[0] if isinstance(model.image_size, (tuple, list)) else model.image_size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    report = Report(
        args.out, model=args.model, images=args.images, batch_size=args.batch_size, device=str(device), threads=torch.get_num_threads()
    )

    corrector = Corrector(model)
    report["sites"] = len(corrector.sites)
    load_weights(model, expert.state_dict())
    target, report["expert_statistics_s"] = timed(
        lambda: corrector.statistics(images, batch_size=args.batch_size), device, "expert statistics"
    )
    load_weights(model, merged.state_dict())
    ours, report["calibrate_ours_s"] = timed(lambda: corrector.calibrate("t", images, target, args.batch_size), device, "calibration, ours")

    with torch.no_grad():
        _, plain = timed(
            lambda: [model(images[i : i + args.batch_size].to(device)) for i in range(0, len(images), args.batch_size)], device
        )
        with corrector.use("t"):
            _, hooked = timed(
                lambda: [model(images[i : i + args.batch_size].to(device)) for i in range(0, len(images), args.batch_size)], device
            )
    corrector.remove()
    with torch.no_grad():
        _, bare = timed(lambda: [model(images[i : i + args.batch_size].to(device)) for i in range(0, len(images), args.batch_size)], device)
    report["forward_bare_s"], report["forward_sites_installed_s"], report["forward_corrected_s"] = bare, plain, hooked

    if not args.no_baselines:
        results = {}
        for name, chain in (("truncated", []), ("naive", [])):
            baseline = Corrector(model, chain=chain)
            if name == "truncated":
                results[name], report[f"calibrate_{name}_s"] = timed(
                    lambda b=baseline: b.calibrate("t", images, target, args.batch_size), device, "calibration, truncated"
                )
            else:
                with contextlib.suppress(KeyError):
                    baseline._plan(images[: args.batch_size].to(device))  # forward order of the sites
                results[name], report[f"calibrate_{name}_s"] = timed(
                    lambda b=baseline: naive_calibrate(b, "t", images, target, args.batch_size), device, "calibration, naive"
                )
            baseline.remove()
            worst = max(float((results[name][s][0] - ours[s][0]).abs().max()) for s in ours)
            report[f"max_scale_difference_{name}"] = worst
        report["speedup_vs_truncated"] = report["calibrate_truncated_s"] / report["calibrate_ours_s"]
        report["speedup_vs_naive"] = report["calibrate_naive_s"] / report["calibrate_ours_s"]

    if args.weight_matching:
        a, b = tower(1).state_dict(), tower(2).state_dict()
        heads = tower(0).transformer.resblocks[0].attn.num_heads
        spec = vit_spec(a, heads)
        result, report["weight_matching_s"] = timed(lambda: weight_matching(spec, a, b, max_iter=args.max_iter, device=device), device)
        report["weight_matching_iterations"] = result.iterations
        report["weight_matching_objective"] = [result.objective[0], result.objective[-1]]

    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
