"""Time and peak anonymous memory of each merge, beside a naive stack-everything baseline.

Synthesizes checkpoints of a real open_clip architecture (random weights, no download) in the
released layout, then runs every job in a fresh child process while the parent samples the
child's RssAnon (pages of memory-mapped checkpoint files, which the kernel can reclaim, do not
count). The naive baseline loads every checkpoint fully, flattens each into one vector, stacks a
(tasks x parameters) matrix and applies the whole-vector formulas, as the paper's code does.

Beside every job it prints the I/O floor, measured in the same run just before the job: the
interpreter's start-up (a child that imports what a job imports, then exits) plus reading the same
checkpoint files once with large sequential reads. Job times are the child's wall time, start-up
included, so "x floor" compares like with like. With FusionBench installed (never a dependency; or
pass ``--fusionbench-python`` of another environment), the sum job also runs its
TaskArithmeticAlgorithm. ``--repeat N`` interleaves N rounds of all jobs and reports medians, and
the median over rounds of each job's time relative to the sum job of the same round.

    python benchmarks/merge_bench.py --model ViT-B-32 --tasks 8
    python benchmarks/merge_bench.py --model ViT-B-32 --tasks 8 --methods sum ties --no-naive --repeat 5
    python benchmarks/merge_bench.py --model ViT-L-14 --tasks 20 --methods ties compress consensus --no-naive
    python benchmarks/merge_bench.py --model ViT-B-32 --tasks 8 --methods lines emr dare tsv iso_c iso_cts \
        --naive-methods lines emr dare tsv iso_c iso_cts

The naive baselines of lines, emr and dare stack the (tasks x parameters) matrix; those of tsv, iso_c
and iso_cts hold every task vector as a state dict and work layer by layer, as their references do.
    python benchmarks/merge_bench.py --methods magmax breadcrumbs model_stock pcb cart \
        --naive-methods magmax breadcrumbs model_stock cart
    python benchmarks/merge_bench.py --methods wudi --wudi-iterations 30 --no-naive
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

ALL_JOBS = [
    "sum",
    "ties",
    "tall_mask",
    "consensus",
    "mag_masking",
    "compress",
    "lines",
    "tsv",
    "iso_c",
    "iso_cts",
    "emr",
    "dare",
    "magmax",
    "breadcrumbs",
    "model_stock",
    "pcb",
    "cart",
    "wudi",
]
#: float32 copies of the (tasks x parameters) matrix a naive job holds at its peak, beyond the default 2T + 3
#: (ties and lines: whole checkpoints, stacked fine-tuned weights, task vectors, magnitudes, trimmed and
#: selected matrices; pcb: its scores on top; both were killed at 24 GB with ViT-B-32 x 8)
NAIVE_COPIES = {"pcb": lambda tasks: 7 * tasks + 3, "ties": lambda tasks: 6 * tasks + 3, "lines": lambda tasks: 6 * tasks + 3}


# ------------------------------------------------------------------------------------------------
# synthetic checkpoints


def write_theta0(model: str, root: Path, seed: int = 0, largest: int | None = None) -> tuple[dict, Path]:
    """theta_0 of a randomly initialised open_clip image tower (only its ``largest`` biggest tensors when
    given), saved in the released layout."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    clip = open_clip.create_model(model, pretrained=None)
    del clip.transformer
    theta0 = {f"model.{k}": v.detach().clone() for k, v in clip.state_dict().items()}
    if largest:
        keep = sorted(theta0, key=lambda k: theta0[k].numel(), reverse=True)[:largest]
        theta0 = {k: theta0[k] for k in sorted(keep)}
    del clip
    (root / "MNISTVal").mkdir(parents=True, exist_ok=True)
    pt = root / "MNISTVal" / "nonlinear_zeroshot.pt"
    torch.save(theta0, pt)
    return theta0, pt


def synthesize(model: str, tasks: int, root: Path, seed: int = 0, largest: int | None = None) -> tuple[Path, list[Path]]:
    """theta_0 from a randomly initialised open_clip image tower (only its ``largest`` biggest tensors when
    given); theta_t = theta_0 + small noise."""
    import torch

    done = root / "done.json"
    identity = {"model": model, "tasks": tasks, **({"largest": largest} if largest else {})}
    if done.exists() and json.loads(done.read_text()) == identity:
        return root / "MNISTVal" / "nonlinear_zeroshot.pt", [root / f"Task{t}Val" / "nonlinear_finetuned.pt" for t in range(tasks)]
    theta0, pt = write_theta0(model, root, seed, largest)
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
    done.write_text(json.dumps(identity))
    return pt, paths


# ------------------------------------------------------------------------------------------------
# child jobs


def _naive(job: str, pt: Path, fts: list[Path], device: str, params: dict | None = None) -> None:
    """The stack-everything baseline: whole checkpoints in memory, a (T x d) matrix, kthvalue. SVDs go
    through the same retrying helper as ours (LAPACK's default driver fails on some Iso-CTS residuals)."""
    import torch

    from tallmasks.merging.layers import svd

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
    elif job == "lines":  # LiNeS over TIES, as its reference: stacked vectors, per-key scales at beta = 0.5
        merged = ties(taus, "mean")
        alpha = float(taus.sum(0).abs().sum() / merged.abs().sum()) / len(fts)
        blocks = 1 + max(i for key in keys for i in range(99) if f".{i}." in key)
        offset, scaled = 0, []
        for key in keys:
            n = theta0[key].numel()
            depth = next((i for i in range(blocks) if f".{i}." in key), None)
            scaled.append(merged[offset : offset + n] * (alpha + 0.5 * (depth / (blocks - 1) if depth is not None else 0.0)))
            offset += n
        merged = torch.cat(scaled)
    elif job == "emr":
        sign = torch.sign(taus.sum(0))
        unified = sign * (taus.abs() * (taus * sign > 0)).max(dim=0).values
        masks = taus * unified > 0
    elif job == "dare":
        generator = torch.Generator().manual_seed(0)
        merged = (taus * (torch.rand(taus.shape, generator=generator) >= 0.9).to(device) / 0.1).sum(0)
    elif job in ("tsv", "iso_c", "iso_cts"):
        # the references' layout: every task vector held as a state dict, then layer by layer
        vectors = [{key: ft[key].float().to(device) - theta0[key].float().to(device) for key in keys} for ft in finetuned]
        del flat0, flat_ft, taus
        for key in keys:
            stack = [v[key] for v in vectors]
            if stack[0].dim() != 2 or "text_projection" in key:
                continue
            if job == "tsv":
                rank, kept = min(stack[0].shape), int(min(stack[0].shape) / len(stack))
                parts = [svd(m) for m in stack]
                u = torch.cat(
                    [p[0][:, :kept] for p in parts] + [torch.zeros(stack[0].shape[0], rank - kept * len(stack), device=device)], 1
                )
                v = torch.cat([p[2][:kept] for p in parts] + [torch.zeros(rank - kept * len(stack), stack[0].shape[1], device=device)], 0)
                svd(u), svd(v)
            else:
                total = sum(stack)
                u, s_, vh = svd(total)
                if job == "iso_cts":
                    common = u[:, : int(0.8 * len(s_))]
                    for m in stack:
                        svd(m - common @ (common.T @ m))
    else:
        raise SystemExit(f"unknown job {job}")
    if device == "cuda":
        torch.cuda.synchronize()


def _naive_magmax(taus, per_key, shapes):
    best = taus.abs().argmax(0)  # first maximum; ties are rare in random data
    return taus.gather(0, best.unsqueeze(0)).squeeze(0)


def _naive_breadcrumbs(taus, per_key, shapes, beta=0.85, gamma=0.993):

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
        angles = [
            math.acos(max(-1.0, min(1.0, float(gram[i, j]) / (math.sqrt(float(gram[i, i] * gram[j, j])) + 1e-8))))
            for i in range(count)
            for j in range(i + 1, count)
        ]
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

    from tallmasks.merging.layers import svd

    def cart(key, rows):
        mean = rows.mean(0)
        centred = rows - mean
        shape = shapes[key]
        if len(shape) == 2 and ("attn" in key or "mlp" in key):
            total = torch.zeros(shape)
            for c in centred:
                u, s, vh = svd(c.reshape(shape))
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


NAIVE_PLAIN = {
    "magmax": _naive_magmax,
    "breadcrumbs": _naive_breadcrumbs,
    "model_stock": _naive_model_stock,
    "pcb": _naive_pcb,
    "cart": _naive_cart,
    "wudi": _naive_wudi,
}


def _ours(job: str, pt: Path, fts: list[Path], device: str, out: Path, params: dict | None = None) -> None:
    from tallmasks.algebra.task_vectors import CheckpointSet
    from tallmasks.io.checkpoints import save_state_dict
    from tallmasks.masks import magnitude_masks, tall_masks
    from tallmasks.merging import merge
    from tallmasks.merging.methods.emr import emr_masks
    from tallmasks.storage.collection import compress

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
    elif job == "lines":
        scaled = merge(cs, "lines", base_method="ties", device=device)
        vector = {key: value * scaled.coefficient(key, 0.5) for key, value in scaled.items()}
    elif job == "emr":
        vector = merge(cs, "emr", device=device)
        emr_masks(cs, vector, device=device)
    else:
        vector = merge(cs, job, device=device, **(params or {}))
    save_state_dict(vector, out / f"{job}.safetensors")


def _read_once(paths: list[Path], chunk_bytes: int = 1 << 23) -> int:
    """The I/O floor: read every file once with large sequential reads into one reused buffer."""
    buffer = memoryview(bytearray(chunk_bytes))
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total


def _fusionbench(job: str, pt: Path, fts: list[Path], out: Path) -> None:
    """FusionBench's TaskArithmeticAlgorithm over modules that hold the checkpoints' tensors, loaded lazily."""
    from fusion_bench.method import TaskArithmeticAlgorithm
    from safetensors.torch import save_file

    if job != "sum":
        raise SystemExit("the FusionBench baseline exists for the sum job only")
    pool = {"_pretrained_": {"_target_": "__main__.state_module", "path": str(pt)}}
    pool.update({f"task{t}": {"_target_": "__main__.state_module", "path": str(p)} for t, p in enumerate(fts)})
    merged = TaskArithmeticAlgorithm(scaling_factor=1.0).run(pool)
    save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()}, str(out / "fusionbench_sum.safetensors"))


def state_module(path: str):
    """A module whose state dict is the checkpoint at ``path`` (torch.load, as a user would)."""
    import torch

    module = torch.nn.Module()
    for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
        *parents, leaf = key.split(".")
        owner = module
        for name in parents:
            if not hasattr(owner, name):
                owner.add_module(name, torch.nn.Module())
            owner = getattr(owner, name)
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    return module


def child(args) -> None:
    fts = [Path(p) for p in args.finetuned]
    if args.impl == "startup":  # what an "ours" child imports before it starts work
        import torch  # noqa: F401

        import tallmasks.merging
        import tallmasks.storage.collection  # noqa: E401, F401

        print(json.dumps({"seconds": 0.0}))
        return
    if args.impl == "read":
        start = time.perf_counter()
        size = _read_once([Path(args.pretrained), *fts])
        print(json.dumps({"seconds": time.perf_counter() - start, "bytes": size}))
        return
    import torch

    if args.impl == "fusionbench":
        import fusion_bench.method  # noqa: F401  (its import time counts in the wall time, not in the work)
    start, cpu_start = time.perf_counter(), time.process_time()
    params = {"iterations": args.wudi_iterations} if args.job == "wudi" else {}
    if args.impl == "naive":
        _naive(args.job, Path(args.pretrained), fts, args.device, params)
    elif args.impl == "fusionbench":
        _fusionbench(args.job, Path(args.pretrained), fts, Path(args.out))
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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd: list[str], timeout: float) -> dict:
    cpu = _children_cpu()
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
        status = (
            "killed (out of memory?)"
            if proc.returncode < 0
            else f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
        )
        return {"status": status, "peak_gb": peak / 1e6, "wall": wall}
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "status": "ok",
        "seconds": result["seconds"],
        "wall": wall,
        "cpu": _children_cpu() - cpu,
        "peak_gb": peak / 1e6,
        **({"bytes": result["bytes"]} if "bytes" in result else {}),
    }


def measure_floor(base_cmd: list[str], timeout: float) -> dict:
    """Start-up (wall of a child that only imports) plus reading the inputs once (timed inside a child)."""
    startup = measure(base_cmd + ["--impl", "startup"], timeout)
    read = measure(base_cmd + ["--impl", "read"], timeout)
    if startup["status"] != "ok" or read["status"] != "ok":
        return {"status": f"floor {startup['status']} / {read['status']}"}
    return {
        "status": "ok",
        "startup": startup["wall"],
        "read": read["seconds"],
        "gb": read["bytes"] / 1e9,
        "wall": startup["wall"] + read["seconds"],
    }


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
    parser.add_argument("--largest", type=int, help="only the N largest tensors of the model (per-layer workspace at real shapes)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all jobs, interleaved; medians reported")
    parser.add_argument("--fusionbench-python", help="interpreter with fusion_bench installed (default: this one, if it has it)")
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
    folder = f"{args.model}-{args.tasks}" + (f"-largest{args.largest}" if args.largest else "")
    pt, fts = synthesize(args.model, args.tasks, workdir / folder, largest=args.largest)
    n_params = sum(v.numel() for k, v in torch.load(pt, mmap=True, weights_only=True).items() if v.dtype.is_floating_point)
    print(
        f"{args.model}, {args.tasks} tasks, {n_params / 1e6:.1f}M parameters per checkpoint, device {device}, "
        f"{torch.get_num_threads()} threads (checkpoints ready in {time.perf_counter() - t0:.0f} s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    naive_estimate_gb = 4 * n_params * (2 * args.tasks + 3) / 1e9
    out_dir = workdir / "out"
    out_dir.mkdir(exist_ok=True)
    fusionbench = args.fusionbench_python or (sys.executable if importlib.util.find_spec("fusion_bench") else None)
    rows = []
    for round_ in range(args.repeat):
        for job in args.methods:
            args_tail = [
                "--child",
                "--job",
                job,
                "--device",
                device,
                "--wudi-iterations",
                str(args.wudi_iterations),
                "--pretrained",
                str(pt),
                "--finetuned",
                *map(str, fts),
                "--out",
                str(out_dir),
            ]
            base_cmd = [sys.executable, __file__, *args_tail]
            row = {"job": job, "round": round_, "floor": measure_floor(base_cmd, args.timeout)}
            row["ours"] = measure(base_cmd + ["--impl", "ours"], args.timeout)
            if not args.no_naive and job in args.naive_methods:
                copies = NAIVE_COPIES.get(job, lambda tasks: 2 * tasks + 3)(args.tasks)
                estimate_gb = naive_estimate_gb * copies / (2 * args.tasks + 3)
                if estimate_gb > args.naive_limit_gb:
                    row["naive"] = {"status": f"skipped (needs about {estimate_gb:.0f} GB)"}
                else:
                    row["naive"] = measure(base_cmd + ["--impl", "naive"], args.timeout)
            if fusionbench and job == "sum":
                row["fusionbench"] = measure([fusionbench, __file__, *args_tail, "--impl", "fusionbench"], args.timeout)
            rows.append(row)
            print(_format_row(row), flush=True)
    summary = _summary(rows, args.methods)
    if args.repeat > 1:
        print(f"medians over {args.repeat} rounds:")
        for line in summary:
            print(line["text"], flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "tasks": args.tasks,
                    "device": device,
                    "params": n_params,
                    "rows": rows,
                    "medians": [{k: v for k, v in line.items() if k != "text"} for line in summary],
                },
                indent=1,
            )
        )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _summary(rows: list[dict], jobs: list[str]) -> list[dict]:
    """Per job: medians of wall time, floor, job/floor and job/sum (the sum job of the same round)."""
    sums = {row["round"]: row["ours"]["wall"] for row in rows if row["job"] == "sum" and row["ours"]["status"] == "ok"}
    lines = []
    for job in jobs:
        done = [row for row in rows if row["job"] == job and row["ours"]["status"] == "ok" and row["floor"]["status"] == "ok"]
        line = {
            "job": job,
            "wall": _median([row["ours"]["wall"] for row in done]),
            "cpu": _median([row["ours"]["cpu"] for row in done]),
            "peak_gb": max((row["ours"]["peak_gb"] for row in done), default=None),
            "floor": _median([row["floor"]["wall"] for row in done]),
            "x_floor": _median([row["ours"]["wall"] / row["floor"]["wall"] for row in done]),
            "x_sum": _median([row["ours"]["wall"] / sums[row["round"]] for row in done if row["round"] in sums]),
            "fusionbench": _median([row["fusionbench"]["wall"] for row in done if row.get("fusionbench", {}).get("status") == "ok"]),
        }
        if line["wall"] is None:
            line["text"] = f"{job:<12} no successful round"
        else:
            line["text"] = (
                f"{job:<12} {line['wall']:6.1f} s wall (cpu {line['cpu']:.1f} s), {line['x_floor']:.2f}x the floor "
                f"of {line['floor']:.1f} s"
                + (f", {line['x_sum']:.2f}x sum" if line["x_sum"] is not None else "")
                + (f", FusionBench {line['fusionbench']:.1f} s" if line["fusionbench"] is not None else "")
                + f", peak RssAnon {line['peak_gb']:.2f} GB"
            )
        lines.append(line)
    return lines


def _format_row(row: dict) -> str:
    ours, floor = row["ours"], row["floor"]
    text = f"{row['job']:<12} ours: "
    if ours["status"] == "ok":
        text += (
            f"{ours['wall']:6.1f} s wall (work {ours['seconds']:.1f} s, cpu {ours['cpu']:.1f} s), peak RssAnon {ours['peak_gb']:5.2f} GB"
        )
        if floor["status"] == "ok":
            text += f", {ours['wall'] / floor['wall']:.2f}x the floor"
    else:
        text += ours["status"]
    if floor["status"] == "ok":
        text += f" | floor {floor['wall']:.1f} s = start-up {floor['startup']:.1f} + reading {floor['gb']:.1f} GB {floor['read']:.1f}"
    else:
        text += f" | {floor['status']}"
    for name in ("naive", "fusionbench"):
        other = row.get(name)
        if not other:
            continue
        if other["status"] == "ok":
            text += f" | {name}: {other['wall']:6.1f} s wall (work {other['seconds']:.1f} s), {other['peak_gb']:5.2f} GB"
            if ours["status"] == "ok":
                text += f" (x{other['wall'] / ours['wall']:.1f} time, /{other['peak_gb'] / max(ours['peak_gb'], 1e-9):.1f} memory)"
        else:
            text += f" | {name}: {other['status']}"
    return text


if __name__ == "__main__":
    main()
