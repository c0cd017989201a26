"""The ``tallmasks`` console command: merge, compress, decompress, inspect, convert and align checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tallmasks.core.errors import ConfigError, TallmasksError
from tallmasks.io.guard import check_output, file_size, require_file

log = logging.getLogger("tallmasks")

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _device(name: str) -> str:
    """The --device value checked (auto, cpu, cuda, cuda:N available here), auto resolved."""
    from tallmasks.eval.distributed import check_device, resolve_device

    return str(resolve_device(check_device(name, "--device")))


def _check_out_file(path: str, option: str = "--out") -> Path:
    out = Path(path).expanduser()
    if out.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"{option} {path}: use a .safetensors or .pt file name")
    if out.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, expected a file name")
    return out


def _inputs(*paths: str | Path) -> list[Path]:
    """The input checkpoints' files, each a regular file (never a pipe or a device); a sharded checkpoint
    gives its index and shards."""
    from tallmasks.io.checkpoints import checkpoint_files

    return [file for path in paths for file in checkpoint_files(path)]


def _sources(args) -> tuple[str | Path, list[str | Path], list[str] | None]:
    """(theta_0, fine-tuned checkpoints, task names) from --pretrained/--finetuned or from --pool."""
    if args.pool is not None:
        if args.pretrained or args.finetuned or args.names:
            raise ConfigError("--pool replaces --pretrained, --finetuned and --names; give one or the other")
        from tallmasks.experiments.pools import load_pool, prepare_pool
        from tallmasks.models import finetuned_path, zeroshot_path

        pool = load_pool(args.pool)
        root = prepare_pool(pool, args.pool_dir, heads=False)
        return zeroshot_path(root, pool.model), [finetuned_path(root, pool.model, d) for d in pool.tasks], list(pool.tasks)
    if not args.pretrained or not args.finetuned:
        raise ConfigError("give --pretrained and --finetuned checkpoints, or a --pool")
    return args.pretrained, list(args.finetuned), _names(args, len(args.finetuned))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _method_params(method: str, given: dict[str, Any], num_tasks: int, option: str = "") -> dict[str, Any]:
    """Hyperparameters given as flags (or ``--param NAME=VALUE`` with ``option``), checked against the
    method's signature like main.py's method fields."""
    from tallmasks.core.params import coerce, parameters
    from tallmasks.merging import get_method

    accepted = parameters(get_method(method).fn, ("device",))
    out = {}
    for key, value in given.items():
        where = f"{option}{key}" if option else _flag(key)
        if key not in accepted:
            if option:
                raise ConfigError(f"{where}: method {method!r} has no hyperparameter {key!r} (it takes {', '.join(accepted) or 'none'})")
            raise ConfigError(f"{where} does not apply to method {method!r}")
        out[key] = coerce(value, accepted[key].annotation, where, {"num_tasks": num_tasks})
    return out


def _names(args, count: int) -> list[str] | None:
    if args.names is None:
        return None
    if len(args.names) != count:
        raise ConfigError(f"--names: {len(args.names)} names for {count} fine-tuned checkpoints")
    return list(args.names)


def _lambdas(values: Sequence[float] | None, default: float) -> float | list[float]:
    from tallmasks.masks import check_lambda

    if not values:
        return default
    values = [check_lambda(v) for v in values]
    return values[0] if len(values) == 1 else list(values)


def _param_items(items: Sequence[str] | None) -> dict[str, str]:
    """``--param NAME=VALUE`` pairs (values still text; the method's signature types them)."""
    out = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        out[name] = text.strip()
    return out


def cmd_merge(args) -> int:
    from tallmasks.algebra.coefficients import ScaledVector
    from tallmasks.algebra.task_vectors import CheckpointSet, apply_vector
    from tallmasks.core.params import coerce
    from tallmasks.io.checkpoints import save_state_dict
    from tallmasks.masks import tall_masks
    from tallmasks.merging import base_vector, get_method, merge

    method = get_method(args.method)
    out = _check_out_file(args.out)
    pretrained, finetuned, names = _sources(args)
    given = {"k": args.k, "use_ties": args.use_ties or None, "ties_agg": args.ties_agg, "prun_thre_k": args.prun_thre_k}
    params: dict = _method_params(args.method, {k: v for k, v in given.items() if v is not None}, len(finetuned))
    params.update(_method_params(args.method, _param_items(args.param), len(finetuned), option="--param "))
    params["device"] = _device(args.device)
    lambdas = _lambdas(args.tall_mask_lambda, 0.4)
    needs_masks = method.needs_masks(params)
    if args.tall_mask_lambda and not needs_masks:
        raise ConfigError(
            "--tall-mask-lambda applies to methods that read TALL masks (consensus, lines with base_method=consensus) and to compress"
        )
    alpha = None if args.alpha is None else coerce(args.alpha, float, "--alpha")
    if alpha is None and method.needs_alpha:
        raise ConfigError(f"method {args.method!r} scales each layer with its own coefficient: pass --alpha to write the merged model")
    inputs = _inputs(pretrained, *finetuned)
    check_output(out, inputs, expected_bytes=sum(file_size(f) for f in _inputs(pretrained)), label="--out")
    cs = CheckpointSet(pretrained, finetuned, names)
    cs.progress = not args.quiet
    if needs_masks:
        base_params = {k: v for k, v in params.items() if k in ("k", "use_ties", "ties_agg", "device")}
        base = base_vector(cs, **base_params)
        params["masks"] = tall_masks(cs, base, lambdas, device=params["device"])
        if "base" in method.defaults:
            params["base"] = base
    vector = merge(cs, args.method, **params)
    if alpha is None:
        result = {key: value.to(cs.dtypes[key]) for key, value in vector.items()}
        what = "merged task vector"
    else:
        result = apply_vector(cs.pretrained, vector, alpha=alpha)
        what = f"merged model (alpha={alpha:g})"
    if isinstance(vector, ScaledVector):
        what += (
            " ("
            + ", ".join(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}" for key, value in vector.info.items())
            + ")"
        )
    save_state_dict(result, out, finite=True)
    log.info("wrote %s of %s over %d tasks (%d parameters) to %s", what, args.method, cs.num_tasks, cs.num_float_params, out)
    return 0


def _released_inputs(args) -> tuple[str, list[str], list[str], str]:
    """theta_0, fine-tuned checkpoints, task names and mask file of --model in the released layout."""
    from tallmasks.datasets import resolve_datasets
    from tallmasks.experiments.runner import datasets_tag, released_mask_paths, tall_mask_path
    from tallmasks.models.paths import finetuned_path, zeroshot_path

    if args.pretrained or args.finetuned:
        raise ConfigError("--model reads the released layout: give it without --pretrained/--finetuned")
    datasets = resolve_datasets(args.num_tasks, args.names)
    location = Path(args.model_location).expanduser()
    finetuned = [str(finetuned_path(location, args.model, d)) for d in datasets]
    masks = args.masks_file
    if masks is None:
        tag = datasets_tag(datasets)  # main.py's masks of a task list other than the paper's first N carry it
        ours = [tall_mask_path(location, args.model, len(datasets), args.use_ties, tag=t) for t in dict.fromkeys((tag, ""))]
        candidates = [*ours, *released_mask_paths(location, args.model, len(datasets), args.use_ties)]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise ConfigError(
                f"no TALL masks at {' or '.join(map(str, candidates[:2]))} (main.py method=tall_mask, or download_checkpoints.py --kind tall_masks)"
            )
        masks = str(found[0])
    return str(zeroshot_path(location, args.model)), finetuned, datasets, masks


def cmd_compress(args) -> int:
    from tallmasks.core.params import Percent, coerce
    from tallmasks.storage.collection import DEFAULT_LAMBDA, collection_report, compress
    from tallmasks.storage.values import VALUE_SETTINGS

    if args.values not in VALUE_SETTINGS:
        raise ConfigError(f"--values must be one of {', '.join(VALUE_SETTINGS)}, got {args.values!r}")
    if args.storage != "coded" and (args.values != "float32" or args.prune_zeros):
        raise ConfigError("--values other than float32 and --prune-zeros need --storage coded (packbits is the paper's float32 scheme)")
    if args.masks != "tall" and (args.use_ties or args.tall_mask_lambda or args.masks_file):
        raise ConfigError("--use-ties, --tall-mask-lambda and --masks-file apply to --masks tall only")
    if args.masks != "magnitude" and args.k is not None:
        raise ConfigError("--k applies to --masks magnitude only")
    if args.masks_file and args.tall_mask_lambda:
        raise ConfigError("--tall-mask-lambda builds masks; it does not apply with --masks-file")
    if args.k is not None:
        coerce(args.k, Percent, "--k")
    if args.model:
        if args.pool:
            raise ConfigError("--model and --pool are two sources of checkpoints; give one")
        pretrained, finetuned, names, masks_file = _released_inputs(args)
    else:
        pretrained, finetuned, names = _sources(args)
        masks_file = args.masks_file
    compress(
        pretrained,
        finetuned,
        args.out,
        names=names,
        use_ties=args.use_ties,
        lambdas=_lambdas(args.tall_mask_lambda, DEFAULT_LAMBDA),  # validated before any work
        masks=args.masks,
        k=args.k if args.k is not None else 10,
        device=_device(args.device),
        progress=not args.quiet,
        storage=args.storage,
        masks_file=masks_file,
        model=args.model,
        values=args.values,
        prune_zeros=args.prune_zeros,
    )
    report = collection_report(args.out)
    log.info(
        "wrote %s (%s): %d tasks, %.2f MB beyond theta_0 (%.3f bytes/parameter, %.3f of the paper's scheme; masks %.3f bits "
        "per weight per task); %d full checkpoints would take %.1f MB",
        args.out,
        report["storage"],
        len(report["tasks"]),
        report["total_bytes"] / 1e6,
        report["bytes_per_param"],
        report["ratio_to_paper"],
        report["mask_bits_per_weight_per_task"],
        len(report["tasks"]),
        sum(file.stat().st_size for file in _inputs(*finetuned)) / 1e6,
    )
    return 0


def cmd_decompress(args) -> int:
    from tallmasks.storage.collection import decompress, read_meta, task_name

    out = _check_out_file(args.out)
    decompress(args.collection, args.task, out, pretrained=args.pretrained)
    log.info("wrote task %s to %s", task_name(read_meta(args.collection), args.task), out)
    return 0


def _profile_lines(agreement: list[int]) -> list[str]:
    total = max(sum(agreement), 1)
    lines = ["tasks switching a weight on   weights      share"]
    for count, n in enumerate(agreement):
        label = {0: " (catastrophic)", 1: " (selfish)"}.get(count, "")
        lines.append(f"  {count:>2}{label:<26} {n:>12,}  {100 * n / total:6.2f}%")
    return lines


def cmd_inspect(args) -> int:
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.masks import MaskSet
    from tallmasks.storage.collection import collection_report, looks_like_collection

    path = Path(args.path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    sharded = path.is_dir() and not looks_like_collection(path) and any(path.glob("*.safetensors*"))
    if path.is_dir() and not sharded:
        if not looks_like_collection(path):
            raise ConfigError(f"{path}: not a compressed collection (no meta.json)")
    elif not sharded:
        require_file(path, "checkpoint or mask")
    is_maskset = not path.is_dir() and path.suffix == ".safetensors" and _is_maskset(path)
    if args.plot:
        if not ((path.is_dir() and not sharded) or is_maskset):
            raise ConfigError(f"--plot draws the agreement of a collection or mask file; {path} is a checkpoint")
        check_output(args.plot, [path], label="--plot")
    if path.is_dir() and not sharded:
        report = collection_report(path)
        agreement = report["agreement"]
        names = report["tasks"]
        densities = report["densities"]
    elif is_maskset:
        masks = MaskSet.load(path)
        names, agreement = masks.names, masks.agreement()
        densities = {n: masks.density(n) for n in names}
        report = {"tasks": names, "num_params": masks.layout.numel, "densities": densities, "agreement": agreement, "masks": masks.info}
    else:
        state = load_state_dict(path)
        dtypes: dict[str, int] = {}
        for key in state:
            dtype = str(state.dtype(key)).replace("torch.", "")
            dtypes[dtype] = dtypes.get(dtype, 0) + state.numel(key)
        size = sum(file.stat().st_size for file in state.files)
        report = {"tensors": len(state), "params_by_dtype": dtypes, "bytes": size, "files": len(state.files)}
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print(f"{path}: {len(state)} tensors, {size / 1e6:.1f} MB" + (f" in {len(state.files)} files" if len(state.files) > 1 else ""))
            for dtype, n in sorted(dtypes.items()):
                print(f"  {dtype:<10} {n:>14,} parameters")
        return 0
    if args.plot:
        from tallmasks.report.plots import plot_agreement

        plot_agreement(agreement, args.plot, title=f"{path.name}: {len(names)} tasks")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{path}: {len(names)} tasks, {report['num_params']:,} parameters")
    if "total_bytes" in report:
        print(
            f"  storage {report['storage']}: {report['total_bytes'] / 1e6:.2f} MB beyond theta_0 = "
            f"{report['bytes_per_param']:.3f} bytes/parameter"
        )
        print(
            f"  paper's scheme (float32 merged vector + 1 bit per weight per task): {report['paper_bytes'] / 1e6:.2f} MB; "
            f"ratio {report['ratio_to_paper']:.3f}"
        )
        print(f"  masks: {report['mask_bits_per_weight_per_task']:.3f} bits per weight per task")
        values = report["values"]
        line = f"  values: {values.get('description') or values['setting']}"
        if values.get("lossy"):
            line += f"; LOSSY, largest |error| {values.get('max_abs_error', float('nan')):.3g}"
        if values.get("prune_zeros"):
            line += "; mask bits of zero values cleared"
        print(line)
    print("  mask density per task: " + ", ".join(f"{n} {100 * d:.1f}%" for n, d in densities.items()))
    scales = (report.get("masks") or {}).get("scales")
    if scales:
        print("  scale per task: " + ", ".join(f"{n} {float(v):.4g}" for n, v in scales.items()))
    for line in _profile_lines(agreement):
        print("  " + line)
    return 0


def _is_maskset(path: Path) -> bool:
    from safetensors import safe_open

    from tallmasks.masks import MASKSET_FORMAT

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == MASKSET_FORMAT
    except Exception:
        return False


def _is_released_head(path: str) -> bool:
    """Whether a .pt file is a pickled ClassificationHead of the paper's code (read from its pickle, not run)."""
    import zipfile

    from tallmasks.io.released import RELEASED_HEAD_CLASS

    module, name = RELEASED_HEAD_CLASS.rsplit(".", 1)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return bool(pickles) and f"{module}\n{name}".encode() in archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return False


def cmd_convert(args) -> int:
    from tallmasks.io.checkpoints import checkpoint_files, checkpoint_size, convert_checkpoint, require_checkpoint

    src = require_checkpoint(args.src)  # a file, or a sharded safetensors folder
    out = _check_out_file(args.dst, "convert: destination")
    check_output(out, [src, *checkpoint_files(src)], expected_bytes=checkpoint_size(src), label="convert: destination")
    if src.is_file() and _is_released_head(str(src)):
        from tallmasks.models.heads import load_released_head

        if out.suffix != ".safetensors":
            raise ConfigError(f"--out {args.dst}: a released head converts to a .safetensors file")
        load_released_head(src).save(out)
    else:
        convert_checkpoint(src, out)
    log.info("wrote %s", out)
    return 0


def cmd_align(args) -> int:
    from tallmasks.non_local.permutation import heads_of_model
    from tallmasks.non_local.weight_matching import align_checkpoint_files

    if args.arch != "vit" and (args.heads is not None or args.model is not None):
        raise ConfigError("--heads and --model apply to --arch vit only")
    heads = args.heads if args.heads is not None else (heads_of_model(args.model) if args.model else None)
    if heads is not None and heads < 1:
        raise ConfigError(f"--heads must be a positive integer, got {heads}")
    record = align_checkpoint_files(
        args.reference,
        args.other,
        args.arch,
        args.out,
        args.experts or [],
        args.names,
        heads,
        args.max_iter,
        args.seed,
        _device(args.device),
    )
    log.info(
        "aligned %s to %s in %d iterations (objective %.6g -> %.6g); wrote %s",
        args.other,
        args.reference,
        record["iterations"],
        *record["objective"],
        args.out,
    )
    return 0


def cmd_report(args) -> int:
    from tallmasks.report.tables import write_report

    paths = args.paths or [p for p in ("results/merging", "results/demo") if Path(p).exists()]
    if not paths:
        raise ConfigError("no results folder given and none of results/merging, results/demo exists")
    written = write_report(paths, args.out)
    log.info(
        "wrote %s, %d CSV files and %d figures to %s", written["markdown"].name, len(written["csv"]), len(written["figures"]), args.out
    )
    return 0


def cmd_prepare_data(args) -> int:
    from tallmasks.datasets.preparation import main as prepare_main

    argv = [*args.names, "--root", args.root] + (["--source", args.source] if args.source else [])
    return prepare_main(argv)


def build_parser() -> argparse.ArgumentParser:
    from tallmasks.merging import METHODS

    parser = argparse.ArgumentParser(prog="tallmasks", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    sub = parser.add_subparsers(dest="command", required=True)

    def checkpoints(p):
        p.add_argument("--pretrained", help="pre-trained checkpoint theta_0 (.pt, .safetensors, or a sharded safetensors folder)")
        p.add_argument("--finetuned", nargs="+", help="fine-tuned checkpoints theta_t (same formats)")
        p.add_argument("--names", nargs="+", help="task names (default: from file names)")
        p.add_argument("--pool", help="instead: a pool of transformers CLIP checkpoints (config/pool/NAME.yaml, or a path)")
        p.add_argument(
            "--pool-dir", default="models/checkpoints", help="where a pool's converted checkpoints are kept (<pool-dir>/hf/<pool name>)"
        )
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")

    merge = sub.add_parser("merge", help="merge task vectors with one method")
    merge.add_argument("--method", required=True, choices=sorted(METHODS))
    checkpoints(merge)
    merge.add_argument("--out", required=True, help="output .safetensors or .pt")
    merge.add_argument("--k", type=float, help="top-k percentage (sum: 100, ties: 20, mag_masking: 10)")
    merge.add_argument("--use-ties", action="store_true", help="TIES (k=20) instead of TA as the base vector")
    merge.add_argument("--ties-agg", choices=["mean", "sum"], help="TIES aggregation (ties: mean, else sum)")
    merge.add_argument("--prun-thre-k", type=int, help="consensus: minimum number of tasks per weight (2)")
    merge.add_argument("--tall-mask-lambda", type=float, nargs="+", help="consensus: lambda, one or one per task (0.4)")
    merge.add_argument("--alpha", type=float, help="write the full model theta_0 + alpha * tau instead of tau (lines: its beta)")
    merge.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="any hyperparameter of the method, e.g. --param p=0.5 --param base_method=ties (dare), "
        "--param beta=0.9 (breadcrumbs); repeatable",
    )
    merge.set_defaults(func=cmd_merge)

    comp = sub.add_parser("compress", help="merged vector + one mask per task (entropy-coded by default)")
    checkpoints(comp)
    comp.add_argument("--out", required=True, help="output folder")
    comp.add_argument("--use-ties", action="store_true", help="TIES (k=20, sum) as the merged vector")
    comp.add_argument("--tall-mask-lambda", type=float, nargs="+", help="lambda, one or one per task (0.4)")
    comp.add_argument(
        "--masks",
        choices=["tall", "magnitude", "emr"],
        default="tall",
        help="TALL masks, magnitude masks, or EMR-merging's masks and rescalers",
    )
    comp.add_argument("--k", type=float, help="magnitude masks: top-k percentage (10)")
    comp.add_argument(
        "--storage",
        choices=["coded", "packbits"],
        default="coded",
        help="coded: masks entropy-coded jointly, merged vector where some mask keeps it (default); packbits: the paper's scheme",
    )
    comp.add_argument(
        "--values",
        default="float32",
        help="how the coded storage keeps the merged vector: float32 (exact, default), or lossy bfloat16, int8, int4, int3, int2 "
        "(absmax per block of 256 weights, round to nearest)",
    )
    comp.add_argument(
        "--prune-zeros",
        action="store_true",
        help="clear the mask bits of weights whose stored value is zero (same models; the stored masks then differ from the TALL masks)",
    )
    comp.add_argument("--masks-file", help="existing TALL masks (ours, or a released TALL_mask_<N>task.npy) instead of building them")
    comp.add_argument("--model", help="read theta_0, the fine-tuned checkpoints and the masks from the released layout")
    comp.add_argument("--num-tasks", type=int, default=8, help="with --model: the first N of the paper's datasets (8)")
    comp.add_argument("--model-location", default="models/checkpoints", help="with --model: checkpoints folder")
    comp.set_defaults(func=cmd_compress)

    dec = sub.add_parser("decompress", help="rebuild one task's model from a compressed collection")
    dec.add_argument("collection")
    dec.add_argument("--task", required=True, help="task name or 0-based index")
    dec.add_argument("--out", required=True)
    dec.add_argument("--pretrained", help="theta_0 if it moved since compression")
    dec.set_defaults(func=cmd_decompress)

    ins = sub.add_parser("inspect", help="sizes, mask densities and agreement profile")
    ins.add_argument("path", help="compressed collection, mask file or checkpoint")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--plot", help="write the agreement profile as a PNG")
    ins.set_defaults(func=cmd_inspect)

    conv = sub.add_parser("convert", help="convert a checkpoint between .pt and .safetensors (a released head .pt to .safetensors)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.set_defaults(func=cmd_convert)

    align = sub.add_parser("align", help="permute a checkpoint (and its experts) to match a reference (weight matching)")
    align.add_argument("--reference", required=True, help="reference foundation (.pt or .safetensors)")
    align.add_argument("--other", required=True, help="foundation to align to the reference")
    align.add_argument(
        "--arch",
        required=True,
        choices=["vit", "cnn", "mlp"],
        help="vit: open_clip VisionTransformer; cnn: torchvision ResNet layout; mlp: a chain of linear/conv layers",
    )
    align.add_argument("--experts", nargs="+", help="checkpoints fine-tuned from --other, permuted likewise")
    align.add_argument("--names", nargs="+", help="expert names (default: from file names)")
    align.add_argument("--out", required=True, help="new output folder")
    align.add_argument("--heads", type=int, help="vit: attention heads per block (default: width / 64)")
    align.add_argument("--model", help="vit: open_clip model name to read the heads from (e.g. ViT-B-32)")
    align.add_argument("--max-iter", type=int, default=100, help="weight matching iteration cap (100)")
    align.add_argument("--seed", type=int, default=0, help="order in which permutation groups are visited (0)")
    align.add_argument("--device", default="cpu", help="cpu, cuda or auto (matrix products; assignments run on the CPU)")
    align.set_defaults(func=cmd_align)

    rep = sub.add_parser("report", help="tables (markdown, CSV) and figures of results beside the paper's, and storage")
    rep.add_argument("paths", nargs="*", help="results files or folders, compressed collections (default: results/merging results/demo)")
    rep.add_argument("--out", default="reports", help="output folder (default reports/)")
    rep.set_defaults(func=cmd_report)

    data = sub.add_parser("prepare-data", help="download or arrange evaluation datasets under a data location")
    data.add_argument("names", nargs="+", help="dataset names, e.g. MNIST SVHN (or 'all')")
    data.add_argument("--root", default="~/data", help="data location (default ~/data)")
    data.add_argument("--source", help="an unpacked copy to arrange from (DTD, SUN397)")
    data.set_defaults(func=cmd_prepare_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (inspect --json | head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
