"""Evaluation throughput, side by side on synthetic images with random weights (no download):

  paper  : JPEG decode + val_preprocess (PIL) per image in DataLoader workers on every pass, fp32 weights
  ours   : the runner's path: each split preprocessed once to a uint8 cache, normalized on the device,
           weights set in place (theta_0 + alpha * tau), bf16 autocast on GPU (--precision)
  bare   : the encoder + head alone on pre-made normalized device tensors, bf16 on GPU

Prints images/s and the ratios ours/bare and ours/paper.

    python benchmarks/eval_bench.py --model ViT-B-32 ViT-L-14 --num-images 8192
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tallmasks.eval.cache import SplitData, load_or_build_split  # noqa: E402
from tallmasks.eval.evaluator import Evaluator, precision_context  # noqa: E402
from tallmasks.models import ClassificationHead, ImageEncoder  # noqa: E402

log = logging.getLogger("eval_bench")


class SyntheticJpegs(Dataset):
    """``n`` items cycling over a few distinct JPEG-encoded images of ``width`` x ``height``; decoded on access."""

    def __init__(self, n: int, width: int, height: int, distinct: int = 64, num_classes: int = 10, transform=None):
        rng = np.random.default_rng(0)
        self.blobs = []
        for _ in range(distinct):
            base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            self.blobs.append(buf.getvalue())
        self.labels = rng.integers(0, num_classes, size=n)
        self.n = n
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        image = Image.open(io.BytesIO(self.blobs[index % len(self.blobs)])).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prediction_agreement(evaluator: Evaluator, head, data: SplitData, precision: str, count: int) -> float:
    """Fraction of the first ``count`` images whose predicted class is the same in ``precision`` and in fp32."""
    from tallmasks.eval.evaluator import precision_context

    images = data.images[:count]
    preds = {}
    for prec in ("fp32", precision):
        out = []
        with precision_context(prec, evaluator.device):
            for i in range(0, len(images), evaluator.batch_size):
                x = evaluator.normalize(images[i : i + evaluator.batch_size].to(evaluator.device))
                out.append(head(evaluator.encoder(x)).argmax(1).cpu())
        preds[prec] = torch.cat(out)
    return float((preds["fp32"] == preds[precision]).float().mean())


def bench_model(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    encoder = ImageEncoder(name, pretrained=None).to(device).eval()
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    tau = {k: 0.01 * torch.randn_like(v) for k, v in theta0.items() if v.dtype.is_floating_point}
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 3, encoder.image_size, encoder.image_size, device=device)).shape[-1]
    head = ClassificationHead(True, torch.randn(args.num_classes, dim)).to(device)
    n, bs = args.num_images, args.batch_size
    out: dict = {"model": name, "images": n, "batch_size": bs, "image_size": encoder.image_size, "device": str(device)}

    # (a) paper-style: decode + PIL preprocessing in workers on every pass, fp32
    paper_ds = SyntheticJpegs(n, args.width, args.height, num_classes=args.num_classes, transform=encoder.val_preprocess)
    loader = DataLoader(
        paper_ds, batch_size=bs, num_workers=args.workers, shuffle=False, pin_memory=device.type == "cuda", persistent_workers=False
    )
    correct = 0
    with torch.no_grad(), precision_context("fp32", device):
        sync(device)
        start = time.perf_counter()
        for images, labels in loader:
            logits = head(encoder(images.to(device, non_blocking=True)))
            correct += int((logits.argmax(1).cpu() == labels).sum())
        sync(device)
        out["paper_images_per_s"] = n / (time.perf_counter() - start)

    # (b) ours: cache once (timed separately), then the runner's evaluator
    with tempfile.TemporaryDirectory() as tmp:
        raw = SyntheticJpegs(n, args.width, args.height, num_classes=args.num_classes)
        start = time.perf_counter()
        data = load_or_build_split(
            lambda: raw, "Synthetic", "test", tmp, encoder.image_size, encoder.val_preprocess, num_workers=args.workers
        )
        out["cache_build_s"] = time.perf_counter() - start
        data = SplitData(data.images.clone(), data.labels.clone())  # detach from the temporary folder
    resident = data.to(device) if (device.type == "cuda" and not args.stream) else data
    evaluator = Evaluator(encoder, theta0, device, args.precision, bs)
    evaluator.load_vector(tau)
    evaluator.set_head("Synthetic", head)
    evaluator.set_weights(0.3)
    evaluator.count_correct("Synthetic", resident)  # warm-up
    times = []
    for p in range(args.passes):
        sync(device)
        start = time.perf_counter()
        evaluator.set_weights(0.1 * (p + 1))  # a new coefficient every pass, as in the alpha search
        evaluator.count_correct("Synthetic", resident)
        sync(device)
        times.append(time.perf_counter() - start)
    out["ours_images_per_s"] = n / float(np.median(times))
    if args.agreement:
        out["top1_agreement_vs_fp32"] = prediction_agreement(evaluator, head, data, args.precision, args.agreement)
    out["ours_precision"] = args.precision
    out["ours_data"] = "device-resident uint8" if resident.images.device.type == "cuda" else "memory-mapped uint8, streamed"

    # (c) bare encoder on pre-made normalized device tensors
    x = evaluator.normalize(data.images[: min(n, bs)].to(device))
    batches = [x] * (n // x.shape[0])
    times = []
    with torch.no_grad(), precision_context(args.precision, device):
        head(encoder(x)).argmax(1)
        for _ in range(args.passes):
            sync(device)
            start = time.perf_counter()
            for b in batches:
                head(encoder(b)).argmax(1)
            sync(device)
            times.append(time.perf_counter() - start)
    out["bare_images_per_s"] = len(batches) * x.shape[0] / float(np.median(times))
    out["ours_over_bare"] = out["ours_images_per_s"] / out["bare_images_per_s"]
    out["ours_over_paper"] = out["ours_images_per_s"] / out["paper_images_per_s"]
    del encoder, evaluator, resident
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="evaluation throughput: paper-style pipeline vs cached uint8 vs bare encoder")
    p.add_argument("--model", nargs="+", default=["ViT-B-32"])
    p.add_argument("--num-images", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--width", type=int, default=400, help="synthetic JPEG width (decoded and resized every pass by the paper pipeline)")
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--precision", default=None, help="ours and bare: bf16 on GPU, fp32 on CPU by default")
    p.add_argument("--stream", action="store_true", help="ours: stream batches from the memory map instead of keeping the split on the GPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--agreement", type=int, default=0, help="also report top-1 agreement with fp32 on this many images")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(
        "cuda" if (args.device == "auto" and torch.cuda.is_available()) else ("cpu" if args.device == "auto" else args.device)
    )
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    rows = []
    for name in args.model:
        row = bench_model(name, args, device)
        rows.append(row)
        print(
            f"{name:10s} {device.type}: paper-style {row['paper_images_per_s']:8.0f} img/s | ours ({args.precision}, "
            f"{row['ours_data']}) {row['ours_images_per_s']:8.0f} img/s | bare {args.precision} {row['bare_images_per_s']:8.0f} img/s | "
            f"ours/bare {row['ours_over_bare']:.2f} | ours/paper {row['ours_over_paper']:.1f}x | cache built once in {row['cache_build_s']:.1f}s"
            + (f" | top-1 agreement with fp32 {row['top1_agreement_vs_fp32']:.4f}" if "top1_agreement_vs_fp32" in row else ""),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
