"""Time and peak anonymous memory of each merge, beside a naive stack-everything baseline.

Synthesizes checkpoints of a real open_clip architecture (random weights, no download) in the
released layout, then runs every job in a fresh child process while the parent samples the
child's RssAnon (pages of memory-mapped checkpoint files, which the kernel can reclaim, do not
count). The naive baseline loads every checkpoint fully, flattens each into one vector, stacks a
(tasks x parameters) matrix and applies the whole-vector formulas, as the paper's code does.

    python benchmarks/merge_bench.py --model ViT-B-32 --tasks 8
    python benchmarks/merge_bench.py --model ViT-L-14 --tasks 20 --methods ties compress consensus --no-naive
    python benchmarks/merge_bench.py --methods magmax breadcrumbs model_stock pcb cart \
        --naive-methods magmax breadcrumbs model_stock cart
    python benchmarks/merge_bench.py --methods wudi --wudi-iterations 30 --no-naive
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

ALL_JOBS = ["sum", "ties", "tall_mask", "consensus", "mag_masking", "compress",
            "magmax", "breadcrumbs", "model_stock", "pcb", "cart", "wudi"]
#: float32 copies of the (tasks x parameters) matrix a naive job holds at its peak, beyond the default 2T + 3
NAIVE_COPIES = {"pcb": lambda tasks: 5 * tasks + 3}


# ------------------------------------------------------------------------------------------------
# synthetic checkpoints


def synthesize(model: str, tasks: int, root: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    """theta_0 from a randomly initialised open_clip image tower; theta_t = theta_0 + small noise."""
    import open_clip
    import torch

    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()) == {"model": model, "tasks": tasks}:
        return root / "MNISTVal" / "nonlinear_zeroshot.pt", [root / f"Task{t}Val" / "nonlinear_finetuned.pt" for t in range(tasks)]
    torch.manual_seed(seed)
    clip = open_clip.create_model(model, pretrained=None)
    del clip.transformer
    theta0 = {f"model.{k}": v.detach().clone() for k, v in clip.state_dict().items()}
    del clip
    (root / "MNISTVal").mkdir(parents=True, exist_ok=True)
    pt = root / "MNISTVal" / "nonlinear_zeroshot.pt"
    torch.save(theta0, pt)
    paths = []
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(tasks):
        folder = root / f"Task{t}Val"
        folder.mkdir(exist_ok=True)
        ft = {}
        for key, value in theta0.items():
            if value.dtype.is_floating_point:
                noise = torch.randn(value.shape, generator=gen) * 1e-3
                # sparse, task-specific large updates so the methods have something to find
                noise += (torch.rand(value.shape, generator=gen) < 0.02) * torch.randn(value.shape, generator=gen) * 1e-2
                ft[key] = value + noise
            else:
                ft[key] = value.clone()
        torch.save(ft, folder / "nonlinear_finetuned.pt")
        paths.append(folder / "nonlinear_finetuned.pt")
        del ft
    done.write_text(json.dumps({"model": model, "tasks": tasks}))
    return pt, paths


# ------------------------------------------------------------------------------------------------
# child jobs


def _naive(job: str, pt: Path, fts: list[Path], device: str, params: dict | None = None) -> None:
    """The stack-everything baseline: whole checkpoints in memory, a (T x d) matrix, kthvalue."""
    import torch

    theta0 = torch.load(pt, map_location="cpu", weights_only=True)
    finetuned = [torch.load(p, map_location="cpu", weights_only=True) for p in fts]
    keys = sorted(k for k, v in theta0.items() if v.dtype.is_floating_point)
    flat0 = torch.cat([theta0[k].reshape(-1) for k in keys]).to(device)
    flat_ft = torch.vstack([torch.cat([ft[k].reshape(-1) for k in keys]) for ft in finetuned]).to(device)
    taus = flat_ft - flat0

    def topk(matrix, k):
        if k >= 100:
            return matrix
        d = matrix.shape[1]
        kth = d - int(d * (k / 100))
        thresholds = matrix.abs().kthvalue(kth, dim=1, keepdim=True).values
        return matrix * (matrix.abs() >= thresholds)

    def ties(matrix, agg):
        trimmed = topk(matrix, 20)
        sign = torch.sign(trimmed.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
        total = selected.sum(0)
        return total / torch.clamp((selected != 0).sum(0).float(), min=1) if agg == "mean" else total

    def per_key(fn):
        """fn(key, (T x numel) slice) -> merged slice, over the keys of the stacked matrix."""
        out, offset = [], 0
        for key in keys:
            n = theta0[key].numel()
            out.append(fn(key, taus[:, offset : offset + n]))
            offset += n
        return torch.cat(out)

    if job in NAIVE_PLAIN:
        merged = NAIVE_PLAIN[job](taus, per_key, {k: tuple(theta0[k].shape) for k in keys}, **(params or {}))
    elif job == "sum":
        merged = taus.sum(0)
    elif job == "ties":
        merged = ties(taus, "mean")
    elif job in ("tall_mask", "compress", "consensus"):
        merged = taus.sum(0)
        masks = (flat0 - flat_ft).abs() > ((flat0 + merged) - flat_ft).abs() * 0.4
        if job == "consensus":
            merged = merged * (masks.sum(0) >= 2)
    elif job == "mag_masking":
        merged = taus.sum(0)
        masks = topk(taus, 10) != 0
    else:
        raise SystemExit(f"unknown job {job}")
    if device == "cuda":
        torch.cuda.synchronize()


def _naive_magmax(taus, per_key, shapes):
    best = taus.abs().argmax(0)  # first maximum; ties are rare in random data
    return taus.gather(0, best.unsqueeze(0)).squeeze(0)


def _naive_breadcrumbs(taus, per_key, shapes, beta=0.85, gamma=0.993):
    import torch

    def crumbs(key, rows):
        n = rows.shape[1]
        if len(shapes[key]) == 0:
            return rows.sum(0)
        ordered = rows.abs().sort(dim=1).values
        keep = rows.abs() >= ordered[:, int(n * beta)].unsqueeze(1)
        if int(n * gamma) < n:
            keep &= rows.abs() < ordered[:, int(n * gamma)].unsqueeze(1)
        return (rows * keep).sum(0)

    return per_key(crumbs)


def _naive_model_stock(taus, per_key, shapes):
    import math

    def stock(key, rows):
        count = rows.shape[0]
        gram = rows.double() @ rows.double().T
        angles = [math.acos(max(-1.0, min(1.0, float(gram[i, j]) / (math.sqrt(float(gram[i, i] * gram[j, j])) + 1e-8))))
                  for i in range(count) for j in range(i + 1, count)]
        cos = math.cos(sum(angles) / len(angles))
        return rows.mean(0) * (count * cos / ((count - 1) * cos + 1 + 1e-8))

    return per_key(stock)


def _naive_pcb(taus, per_key, shapes, ratio=0.1, clamp_ratio=1e-4):
    import torch

    count, d = taus.shape

    def kth(x, index):
        return x.kthvalue(index + 1, dim=1, keepdim=True).values

    low, high = kth(taus.abs(), int(d * clamp_ratio)), kth(taus.abs(), int(d * (1 - clamp_ratio) - 1))
    magnitude = torch.clamp(taus.abs(), low, high)
    scores = torch.exp(count * ((magnitude - low) / (high - low)) ** 2) * torch.tanh(taus * taus.sum(0))
    cut, top = kth(scores, int(d * (1 - ratio))), scores.max(1, keepdim=True).values
    scale = (torch.clamp(scores, cut, top) - cut) / (top - cut)
    return (torch.sign(taus) * magnitude * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)


def _naive_cart(taus, per_key, shapes, rank_ratio=0.12, prior=2.0):
    import torch

    def cart(key, rows):
        mean = rows.mean(0)
        centred = rows - mean
        shape = shapes[key]
        if len(shape) == 2 and ("attn" in key or "mlp" in key):
            total = torch.zeros(shape)
            for c in centred:
                u, s, vh = torch.linalg.svd(c.reshape(shape), full_matrices=False)
                r = max(1, int(rank_ratio * len(s)))
                total += (u[:, :r] * s[:r]) @ vh[:r]
            return mean + prior * total.reshape(-1)
        return mean + prior * centred.sum(0)

    return per_key(cart)


def _naive_wudi(taus, per_key, shapes, iterations=300, lr=1e-5):
    import torch

    def wudi(key, rows):
        shape = shapes[key]
        if not (len(shape) == 2 and ("attn" in key or "mlp" in key)):
            return torch.zeros(rows.shape[1])
        vectors = rows.reshape(-1, *shape)
        merged = torch.nn.Parameter(vectors.sum(0).clone())
        norms = vectors.reshape(len(vectors), -1).square().sum(1)
        optimizer = torch.optim.Adam([merged], lr=lr)
        for _ in range(iterations):  # the reference's autograd loss, two products per task and step
            loss = (torch.matmul(merged.unsqueeze(0) - vectors, vectors.transpose(1, 2)).square() / norms.view(-1, 1, 1)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return merged.detach().reshape(-1)

    return per_key(wudi)


NAIVE_PLAIN = {"magmax": _naive_magmax, "breadcrumbs": _naive_breadcrumbs, "model_stock": _naive_model_stock,
               "pcb": _naive_pcb, "cart": _naive_cart, "wudi": _naive_wudi}


def _ours(job: str, pt: Path, fts: list[Path], device: str, out: Path, params: dict | None = None) -> None:
    from tallmasks.compression import compress
    from tallmasks.masks import magnitude_masks, tall_masks
    from tallmasks.merging import merge
    from tallmasks.checkpoints import save_state_dict
    from tallmasks.task_vectors import CheckpointSet

    if job == "compress":
        compress(pt, fts, out / "collection", device=device)
        return
    cs = CheckpointSet(pt, fts)
    if job == "tall_mask":
        vector = merge(cs, "tall_mask", device=device)
        tall_masks(cs, vector, 0.4, device=device)
    elif job == "consensus":
        vector = merge(cs, "tall_mask", device=device)
        masks = tall_masks(cs, vector, 0.4, device=device)
        vector = merge(cs, "consensus", masks=masks, base=vector, device=device)
    elif job == "mag_masking":
        vector = merge(cs, "mag_masking", device=device)
        magnitude_masks(cs, 10, device=device)
    else:
        vector = merge(cs, job, device=device, **(params or {}))
    save_state_dict(vector, out / f"{job}.safetensors")


def child(args) -> None:
    import torch

    fts = [Path(p) for p in args.finetuned]
    start, cpu_start = time.perf_counter(), time.process_time()
    params = {"iterations": args.wudi_iterations} if args.job == "wudi" else {}
    if args.impl == "naive":
        _naive(args.job, Path(args.pretrained), fts, args.device, params)
    else:
        _ours(args.job, Path(args.pretrained), fts, args.device, Path(args.out), params)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------------
# parent: run, sample RssAnon, report


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_anon_kb(proc.pid))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    wall = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        stop.set()
        return {"status": "timeout", "peak_gb": peak / 1e6}
    wall = time.perf_counter() - wall
    stop.set()
    thread.join()
    if proc.returncode != 0:
        status = "killed (out of memory?)" if proc.returncode < 0 else f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
        return {"status": status, "peak_gb": peak / 1e6, "wall": wall}
    result = json.loads(out.strip().splitlines()[-1])
    return {"status": "ok", "seconds": result["seconds"], "cpu_seconds": result.get("cpu_seconds"), "wall": wall,
            "peak_gb": peak / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=ALL_JOBS, choices=ALL_JOBS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", help="where synthetic checkpoints are kept (default: a temp folder)")
    parser.add_argument("--no-naive", action="store_true", help="skip the stack-everything baseline")
    parser.add_argument("--naive-methods", nargs="+", default=["sum"], help="jobs to run the baseline for")
    parser.add_argument("--naive-limit-gb", type=float, default=20.0, help="skip the baseline when its estimate exceeds this")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--wudi-iterations", type=int, default=300, help="Adam steps of the wudi job (default 300)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help=argparse.SUPPRESS)
    parser.add_argument("--finetuned", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tallmasks-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pt, fts = synthesize(args.model, args.tasks, workdir / f"{args.model}-{args.tasks}")
    n_params = sum(v.numel() for k, v in torch.load(pt, mmap=True, weights_only=True).items() if v.dtype.is_floating_point)
    print(f"{args.model}, {args.tasks} tasks, {n_params / 1e6:.1f}M parameters per checkpoint, device {device}, "
          f"{torch.get_num_threads()} threads (checkpoints ready in {time.perf_counter() - t0:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    naive_estimate_gb = 4 * n_params * (2 * args.tasks + 3) / 1e9
    out_dir = workdir / "out"
    out_dir.mkdir(exist_ok=True)
    rows = []
    for job in args.methods:
        base_cmd = [sys.executable, __file__, "--child", "--job", job, "--device", device,
                    "--wudi-iterations", str(args.wudi_iterations),
                    "--pretrained", str(pt), "--finetuned", *map(str, fts), "--out", str(out_dir)]
        ours = measure(base_cmd + ["--impl", "ours"], args.timeout)
        row = {"job": job, "ours": ours}
        if not args.no_naive and job in args.naive_methods:
            copies = NAIVE_COPIES.get(job, lambda tasks: 2 * tasks + 3)(args.tasks)
            estimate_gb = naive_estimate_gb * copies / (2 * args.tasks + 3)
            if estimate_gb > args.naive_limit_gb:
                row["naive"] = {"status": f"skipped (needs about {estimate_gb:.0f} GB)"}
            else:
                row["naive"] = measure(base_cmd + ["--impl", "naive"], args.timeout)
        rows.append(row)
        print(_format_row(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "tasks": args.tasks, "device": device,
                                                "params": n_params, "rows": rows}, indent=1))


def _format_row(row: dict) -> str:
    ours = row["ours"]
    text = f"{row['job']:<12} ours: "
    text += (f"{ours['seconds']:7.1f} s ({ours['cpu_seconds']:.1f} s CPU), peak RssAnon {ours['peak_gb']:5.2f} GB"
             if ours["status"] == "ok" else ours["status"])
    naive = row.get("naive")
    if naive:
        if naive["status"] == "ok":
            text += f" | naive: {naive['seconds']:7.1f} s ({naive['cpu_seconds']:.1f} s CPU), {naive['peak_gb']:5.2f} GB"
            if ours["status"] == "ok":
                text += f" | speed-up x{naive['seconds'] / ours['seconds']:.1f}, memory /{naive['peak_gb'] / max(ours['peak_gb'], 1e-9):.1f}"
        else:
            text += f" | naive: {naive['status']}"
    return text


if __name__ == "__main__":
    main()
