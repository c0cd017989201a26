"""Storage of compressed collections: the coded format beside the paper's scheme (packbits), from real files.

For every collection it runs ``compress`` twice (``--storage packbits`` and ``--storage coded``, same
masks), checks that both decompress every task to the same bits, and reports the masks' bits per weight
per task, the bytes beyond theta_0 and their ratio to the paper's scheme, and the time to decompress one
task beside the time to read one fine-tuned checkpoint (in the same run, as a ratio).

Collections:
- ``--demo [CACHE]``: every TALL-mask file the demo saved beside its newest experts
  (``.demo_cache/foundation-*/experts-*/tall_masks/...``: 8 tasks after ``make demo``, 14 and 20 after
  ``--num-tasks 14`` / ``20``), with the demo's own checkpoints and chosen masks;
- ``--synthetic MODEL --tasks 8 14 20``: real-size checkpoints of the open_clip architecture with random
  task vectors (``merge_bench.synthesize``; a worst case: no structure to find), TA masks at lambda 0.4;
- ``--resampled MODEL --tasks 8 14 20``: real-size checkpoints whose task-vector tuples are drawn, tensor
  by tensor, from the demo's real experts (same tensor role, positions drawn at random; beyond the demo's
  task count, further tasks come from independent draws), masks with the demo's chosen lambdas; realistic
  joint mask statistics at real size, without the spatial structure of real checkpoints.

    python benchmarks/collection_bench.py --demo --synthetic ViT-B-32 --tasks 8 --json benchmarks/results/collection_bench_scenes_2cpu.json
    python benchmarks/collection_bench.py --synthetic ViT-B-32 --tasks 8
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _read_all(path: Path) -> float:
    """Seconds to load a checkpoint into memory (every tensor read, as a model's load_state_dict does)."""
    from tallmasks.io.checkpoints import load_state_dict

    start = time.perf_counter()
    state = load_state_dict(path)
    loaded = {key: state[key].clone() for key in state}
    del loaded
    return time.perf_counter() - start


def _same_bits(a: dict, b: dict) -> bool:
    import torch

    def raw(t):
        return t.reshape(-1).contiguous().view(torch.uint8) if t.dtype.is_floating_point else t

    return set(a) == set(b) and all(torch.equal(raw(a[k]), raw(b[k])) for k in a)


def measure(
    label: str,
    pretrained: Path,
    finetuned: list[Path],
    names: list[str],
    workdir: Path,
    masks_file: Path | None = None,
    lambdas=0.4,
    use_ties: bool = False,
    check_tasks: int | None = None,
) -> dict:
    """Compress one collection both ways and return sizes, rates and timings."""
    from tallmasks.storage.collection import collection_report, compress, decompress

    row: dict = {"collection": label, "tasks": len(names)}
    out = {}
    for storage in ("packbits", "coded"):
        target = workdir / f"collection-{storage}"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        compress(pretrained, finetuned, target, names=names, use_ties=use_ties, lambdas=lambdas, storage=storage, masks_file=masks_file)
        row[f"{storage}_compress_s"] = round(time.perf_counter() - start, 2)
        out[storage] = target
    packbits, coded = collection_report(out["packbits"]), collection_report(out["coded"])
    tasks = names[: check_tasks or len(names)]
    same = True
    for name in tasks:
        same &= _same_bits(decompress(out["packbits"], name), decompress(out["coded"], name))
    read = min(_read_all(finetuned[0]) for _ in range(3))
    timings = {}
    for storage in ("packbits", "coded"):
        timings[storage] = min(_timed(decompress, out[storage], names[0]) for _ in range(3))
    agreement = coded["agreement"]
    row.update(
        {
            "num_params": coded["num_params"],
            "catastrophic_share": agreement[0] / max(sum(agreement), 1),
            "finetuned_bytes": sum(Path(p).stat().st_size for p in finetuned),
            "paper_bytes": coded["paper_bytes"],
            "packbits_bytes": packbits["total_bytes"],
            "coded_bytes": coded["total_bytes"],
            "ratio_to_paper": coded["total_bytes"] / coded["paper_bytes"],
            "mask_bits_per_weight_per_task": coded["mask_bits_per_weight_per_task"],
            "kept_share": coded["kept_weights"] / max(coded["num_params"], 1),
            "identical_tasks_checked": len(tasks) if same else 0,
            "read_checkpoint_s": round(read, 3),
            "decompress_packbits_s": round(timings["packbits"], 3),
            "decompress_coded_s": round(timings["coded"], 3),
            "coded_vs_read": timings["coded"] / read,
        }
    )
    if not same:
        raise SystemExit(f"{label}: coded and packbits collections decompress differently")
    return row


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# collections


def demo_collections(cache: Path) -> list[dict]:
    """(label, inputs) of every TALL-mask file of the newest demo run under ``cache``."""
    from tallmasks.masks import MaskSet
    from tallmasks.models.paths import finetuned_path, zeroshot_path

    def plain(files):  # the demo's own masks, not those the non-local experiment saves beside them (suffixed)
        return [f for f in files if re.fullmatch(r"TALL_mask_\d+task(_use_ties_sum)?_[0-9a-f]+\.safetensors", f.name)]

    runs = sorted(plain(cache.glob("foundation-*/experts-*/tall_masks/*/TALL_mask_*task*.safetensors")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"{cache}: no demo masks (run `make demo` first)")
    newest = runs[-1].parents[2]  # the experts folder of the newest masks
    found = []
    for mask_file in sorted(plain(newest.glob("tall_masks/*/TALL_mask_*task*.safetensors"))):
        model = mask_file.parent.name
        location = newest / "checkpoints"
        masks = MaskSet.load(mask_file)
        found.append(
            {
                "label": f"demo {model}, {len(masks)} tasks, {'TIES' if 'use_ties' in mask_file.name else 'TA'} masks",
                "pretrained": zeroshot_path(location, model),
                "finetuned": [finetuned_path(location, model, n) for n in masks.names],
                "names": masks.names,
                "masks_file": mask_file,
                "use_ties": "use_ties" in mask_file.name,
            }
        )
    return found


def _role(key: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", key)


def synthesize_resampled(model: str, tasks: int, root: Path, source: dict, seed: int = 0) -> tuple[Path, list[Path]]:
    """Real-size checkpoints of ``model`` whose task vectors are drawn from the demo's experts, role by role."""
    import torch
    from merge_bench import write_theta0

    from tallmasks.io.checkpoints import load_state_dict

    theta_src = load_state_dict(source["pretrained"])
    fts_src = [load_state_dict(p) for p in source["finetuned"]]
    pool: dict[str, list[torch.Tensor]] = {}
    for key in theta_src:
        if not theta_src[key].dtype.is_floating_point:
            continue
        flat0 = theta_src[key].reshape(-1).float()
        taus = torch.stack([ft[key].reshape(-1).float() - flat0 for ft in fts_src], 1)  # n x T_src
        pool.setdefault(_role(key.removeprefix("model.")), []).append(taus)
    pool_cat = {role: torch.cat(parts) for role, parts in pool.items()}
    everything = torch.cat(list(pool_cat.values()))
    theta0, pt = write_theta0(model, root, seed)
    width = everything.shape[1]
    paths = []
    for t in range(tasks):  # one checkpoint in memory at a time; task t reads column t % width of draw t // width
        state = {}
        for number, (key, value) in enumerate(theta0.items()):
            if not value.dtype.is_floating_point:
                state[key] = value.clone()
                continue
            source_taus = pool_cat.get(_role(key.removeprefix("model.")), everything)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + number * 1009 + t // width)
            rows = torch.randint(source_taus.shape[0], (value.numel(),), generator=gen)
            state[key] = value + source_taus[rows, t % width].reshape(value.shape)
        folder = root / f"Task{t}Val"
        folder.mkdir(exist_ok=True)
        torch.save(state, folder / "nonlinear_finetuned.pt")
        paths.append(folder / "nonlinear_finetuned.pt")
        del state
    return pt, paths


def _print(rows: list[dict]) -> None:
    print(
        "| collection | parameters | catastrophic | kept | masks, bits/weight/task | paper's scheme | packbits | coded | "
        "coded / paper | read one checkpoint | decompress one task (packbits, coded) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['collection']} | {r['num_params'] / 1e6:.1f}M | {100 * r['catastrophic_share']:.1f}% | "
            f"{100 * r['kept_share']:.1f}% | {r['mask_bits_per_weight_per_task']:.3f} | {r['paper_bytes'] / 1e6:.1f} MB | "
            f"{r['packbits_bytes'] / 1e6:.1f} MB | {r['coded_bytes'] / 1e6:.2f} MB | {r['ratio_to_paper']:.3f} | "
            f"{r['read_checkpoint_s']:.2f} s | {r['decompress_packbits_s']:.2f} s, {r['decompress_coded_s']:.2f} s "
            f"({r['coded_vs_read']:.1f}x reading) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", nargs="?", const=".demo_cache", help="the demo's cache folder (default .demo_cache)")
    parser.add_argument("--synthetic", help="open_clip model of random synthetic checkpoints (worst case)")
    parser.add_argument("--resampled", help="open_clip model of checkpoints resampled from the demo's experts")
    parser.add_argument("--tasks", type=int, nargs="+", default=[8])
    parser.add_argument("--workdir", help="where synthetic checkpoints and collections go (default: a temp folder, removed)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if not (args.demo or args.synthetic or args.resampled):
        parser.error("choose --demo, --synthetic MODEL or --resampled MODEL")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tallmasks-collections-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        if args.demo:
            for c in demo_collections(Path(args.demo)):
                rows.append(
                    measure(
                        c["label"], c["pretrained"], c["finetuned"], c["names"], workdir, masks_file=c["masks_file"], use_ties=c["use_ties"]
                    )
                )
                _print(rows[-1:])
        for kind, model in (("synthetic", args.synthetic), ("resampled", args.resampled)):
            if not model:
                continue
            source = demo_collections(Path(args.demo or ".demo_cache"))[0] if kind == "resampled" else None
            for tasks in args.tasks:
                root = workdir / f"{kind}-{model}-{tasks}"
                if kind == "synthetic":
                    from merge_bench import synthesize

                    pt, fts = synthesize(model, tasks, root)
                    lambdas = 0.4
                else:
                    from tallmasks.masks import MaskSet

                    pt, fts = synthesize_resampled(model, tasks, root, source)
                    chosen = list(MaskSet.load(source["masks_file"]).info.get("lambdas", {}).values()) or [0.4]
                    lambdas = [chosen[t % len(chosen)] for t in range(tasks)]
                label = f"{model}, {tasks} tasks, {'random task vectors' if kind == 'synthetic' else 'resampled from the demo'}"
                rows.append(measure(label, pt, fts, [f"Task{t}" for t in range(tasks)], workdir, lambdas=lambdas, check_tasks=2))
                _print(rows[-1:])
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    _print(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
