"""Git Re-Basin weight matching (Ainsworth et al. 2023), with the multi-head step of the non-local
merging paper's code, and the alignment of several foundations and their experts.

Weight matching maximizes sum_keys <theta_a, P(theta_b)> by coordinate descent over the permutation
groups, visited in a random order each iteration; each step solves a linear assignment problem
(scipy's ``linear_sum_assignment``) with the other groups fixed, and keeps the new permutation only if
it improves the objective. It stops when an iteration changes nothing or after ``max_iter`` iterations.
Head-structured groups first assign heads by the summed similarity of their units, then units within
each matched pair of heads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.non_local.permutation import (
    Permutation,
    PermutationSpec,
    PermutedStateDict,
    check_permutation,
    identity_permutation,
    permute_tensor,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_ITER = 100


def _unit_matrix(tensor: torch.Tensor, dim: int, repeats: int) -> torch.Tensor:
    """(units, rest) view of ``tensor`` with axis ``dim`` (``repeats`` blocks of units) as rows."""
    if repeats > 1:
        shape = tensor.shape
        n = shape[dim] // repeats
        tensor = tensor.reshape(*shape[:dim], repeats, n, *shape[dim + 1 :])
        dim += 1
    return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1)


def similarity(
    spec: PermutationSpec,
    group: str,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    perm: Permutation,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A[i, j] = similarity of unit i of ``a`` and unit j of ``b`` (other groups of ``b`` permuted), float64."""
    n = spec.sizes[group]
    total = torch.zeros(n, n, dtype=torch.float64, device=device)
    for key, dim, repeats in spec.members[group]:
        wa = _unit_matrix(a[key].to(device, torch.float64), dim, repeats)
        wb = _unit_matrix(permute_tensor(spec, perm, key, b[key].to(device), skip=dim).to(torch.float64), dim, repeats)
        total += wa @ wb.T
    return total


def assign(scores: np.ndarray, heads: int | None = None) -> np.ndarray:
    """The permutation maximizing sum_i scores[i, perm[i]]; with ``heads``, heads are matched first by
    their summed scores, then units within each matched pair of heads (as the non-local paper's code)."""
    from scipy.optimize import linear_sum_assignment

    if heads is None:
        rows, cols = linear_sum_assignment(scores, maximize=True)
        return cols[np.argsort(rows)]
    n = scores.shape[0]
    width = n // heads
    blocks = scores.reshape(heads, width, heads, width)
    _, head_perm = linear_sum_assignment(blocks.sum(axis=(1, 3)), maximize=True)
    parts = []
    for head, match in enumerate(head_perm):
        _, cols = linear_sum_assignment(blocks[head, :, match, :], maximize=True)
        parts.append(cols + match * width)
    return np.concatenate(parts)


@dataclass
class MatchResult:
    """A found permutation, the objective after every accepted step, and the iterations run."""

    perm: Permutation
    objective: list[float]
    iterations: int


def weight_matching(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    max_iter: int = DEFAULT_MAX_ITER,
    seed: int = 0,
    init: Permutation | None = None,
    device: torch.device | str = "cpu",
    callback: Callable[[int, str, Permutation], None] | None = None,
) -> MatchResult:
    """The permutation of ``b``'s units that best matches ``a`` (Git Re-Basin weight matching).

    ``callback(iteration, group, perm)`` is called after every group step.
    """
    if int(max_iter) < 1:
        raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}")
    spec.check(a, "reference")
    spec.check(b, "other")
    a = {key: a[key].to(device, torch.float32) for key in spec.axes}
    b = {key: b[key].to(device, torch.float32) for key in spec.axes}
    perm = identity_permutation(spec) if init is None else {g: p.clone() for g, p in init.items()}
    check_permutation(spec, perm)
    groups = spec.groups
    generator = torch.Generator().manual_seed(int(seed))
    objective = [_objective(spec, a, b, perm)]
    iteration = 0
    for iteration in range(1, int(max_iter) + 1):
        progress = False
        for index in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[index]
            if spec.sizes[group] == 0:  # no units: nothing to permute
                continue
            scores = similarity(spec, group, a, b, perm, device)
            candidate = torch.from_numpy(assign(scores.cpu().numpy(), spec.heads.get(group))).to(torch.int64)
            rows = torch.arange(spec.sizes[group])
            old = float(scores[rows, perm[group].to(scores.device)].sum())
            new = float(scores[rows, candidate.to(scores.device)].sum())
            if new > old + 1e-12:
                perm[group] = candidate
                progress = True
                objective.append(objective[-1] + new - old)
            if callback is not None:
                callback(iteration, group, perm)
        log.debug("weight matching iteration %d: objective %.6g", iteration, objective[-1])
        if not progress:
            break
    return MatchResult(perm, objective, iteration)


def _objective(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], perm: Permutation) -> float:
    return float(sum((a[key].double() * permute_tensor(spec, perm, key, b[key]).double()).sum() for key in spec.axes if a[key].numel()))


# ---------------------------------------------------------------------------------------------
# several foundations


class MeanStateDict(Mapping[str, torch.Tensor]):
    """The element-wise mean of several state dicts, computed per key on access (float32 arithmetic,
    the first state's dtype; non-floating entries come from the first state)."""

    def __init__(self, states: Sequence[Mapping[str, torch.Tensor]]):
        if not states:
            raise CheckpointError("no foundations to average")
        self.states = list(states)

    def __getitem__(self, key: str) -> torch.Tensor:
        first = self.states[0][key]
        if not first.dtype.is_floating_point:
            return first
        total = torch.zeros(first.shape, dtype=torch.float32)
        for state in self.states:
            total += state[key].to(torch.float32)
        return (total / len(self.states)).to(first.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.states[0])

    def __len__(self) -> int:
        return len(self.states[0])

    def shape(self, key: str) -> tuple[int, ...]:
        shape = getattr(self.states[0], "shape", None)
        return tuple(shape(key)) if callable(shape) else tuple(self.states[0][key].shape)

    def dtype(self, key: str) -> torch.dtype:
        dtype = getattr(self.states[0], "dtype", None)
        return dtype(key) if callable(dtype) else self.states[0][key].dtype


@dataclass
class AlignedCollection:
    """Foundations aligned to the first one, their experts permuted likewise, and theta_0 = their mean."""

    theta0: MeanStateDict
    foundations: list[Mapping[str, torch.Tensor]]
    experts: list[Mapping[str, torch.Tensor]]
    perms: list[Permutation]  # one per foundation (identity for the reference)
    results: list[MatchResult | None]


def align_foundations(
    spec: PermutationSpec,
    foundations: Sequence[Mapping[str, torch.Tensor]],
    experts: Sequence[Mapping[str, torch.Tensor]] = (),
    expert_foundation: Sequence[int] = (),
    max_iter: int = DEFAULT_MAX_ITER,
    seed: int = 0,
    perms: Sequence[Permutation | None] | None = None,
    device: torch.device | str = "cpu",
) -> AlignedCollection:
    """Align every foundation to ``foundations[0]`` by weight matching, permute each expert like the
    foundation it was fine-tuned from (``expert_foundation[i]``), and average the aligned foundations.

    ``perms`` reuses known permutations (None entries are computed). Experts are permuted lazily.
    """
    if len(foundations) < 1:
        raise ConfigError("align_foundations needs at least one foundation")
    if len(experts) != len(expert_foundation):
        raise ConfigError(f"{len(experts)} experts but {len(expert_foundation)} foundation indices")
    for index in expert_foundation:
        if not 0 <= int(index) < len(foundations):
            raise ConfigError(f"expert foundation index {index} out of range for {len(foundations)} foundations")
    found: list[Permutation] = []
    results: list[MatchResult | None] = []
    for i, foundation in enumerate(foundations):
        known = perms[i] if perms is not None and i < len(perms) else None
        if i == 0:
            found.append(identity_permutation(spec))
            results.append(None)
        elif known is not None:
            check_permutation(spec, known)
            found.append(known)
            results.append(None)
        else:
            result = weight_matching(spec, foundations[0], foundation, max_iter=max_iter, seed=seed, device=device)
            log.info(
                "foundation %d aligned to the reference in %d iterations (objective %.6g -> %.6g)",
                i,
                result.iterations,
                result.objective[0],
                result.objective[-1],
            )
            found.append(result.perm)
            results.append(result)
    aligned = [PermutedStateDict(f, spec, p) if i else f for i, (f, p) in enumerate(zip(foundations, found))]
    permuted = [PermutedStateDict(e, spec, found[int(i)]) if int(i) else e for e, i in zip(experts, expert_foundation)]
    return AlignedCollection(MeanStateDict(aligned), aligned, permuted, found, results)


def save_permutation(perm: Permutation, path, metadata: dict[str, str] | None = None) -> None:
    """Save a permutation (one int64 tensor per group) as safetensors, atomically."""
    from tallmasks.io.checkpoints import save_state_dict

    save_state_dict(
        {group: p.to(torch.int64).contiguous() for group, p in perm.items()},
        path,
        metadata={"format": "tallmasks-permutation-v1", **(metadata or {})},
    )


def load_permutation(path) -> Permutation:
    """A permutation saved by :func:`save_permutation`."""
    from tallmasks.io.checkpoints import load_state_dict

    state = load_state_dict(path)
    return {group: state[group].to(torch.int64) for group in state}


def align_checkpoint_files(
    reference,
    other,
    arch: str,
    out,
    experts: Sequence = (),
    names: Sequence[str] | None = None,
    heads: int | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Align checkpoint ``other`` to ``reference`` and write, into the new folder ``out``:
    ``foundation.safetensors`` (other, permuted), ``theta0.safetensors`` (the mean of the two),
    ``permutation.safetensors``, ``experts/<name>.safetensors`` (experts of ``other``, permuted) and
    ``alignment.json``. Expert names must each be a plain file name; the names, inputs and output are checked
    before any work, weights holding NaN or Inf are refused; the folder appears only when complete."""
    import json
    import os
    from pathlib import Path

    from tallmasks.algebra.task_vectors import default_name
    from tallmasks.io.checkpoints import load_state_dict, materialize, require_finite, save_state_dict
    from tallmasks.io.guard import atomic_output, check_output, file_size, require_file, safe_name
    from tallmasks.non_local.permutation import apply_permutation, spec_for

    if names is None:
        names = [safe_name(default_name(p, i), f"expert name (from {p}; pass --names)") for i, p in enumerate(experts)]
    else:
        names = [safe_name(n, "--names entry") for n in names]
    if len(names) != len(experts):
        raise ConfigError(f"--names: {len(names)} names for {len(experts)} experts")
    if len(set(names)) != len(names):
        raise ConfigError(f"expert names are not unique: {names} (pass --names)")
    inputs = [require_file(p, "checkpoint") for p in (reference, other, *experts)]
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists; choose a new folder")
    check_output(out, inputs, expected_bytes=sum(file_size(p) for p in inputs[1:]) + file_size(reference), folder=True, label="--out")
    ref = materialize(load_state_dict(reference))
    require_finite(ref, reference)
    spec = spec_for(arch, ref, heads)
    oth = materialize(load_state_dict(other))
    require_finite(oth, other)
    _same_layout(ref, oth, str(other))
    spec.check(oth, str(other))
    expert_states = [load_state_dict(p) for p in experts]
    for path, state in zip(experts, expert_states):
        _same_layout(ref, state, str(path))
    result = weight_matching(spec, ref, oth, max_iter=max_iter, seed=seed, device=device)
    aligned = apply_permutation(spec, result.perm, oth)
    record = {
        "arch": arch,
        "reference": str(reference),
        "other": str(other),
        "experts": dict(zip(names, map(str, experts))),
        "iterations": result.iterations,
        "objective": [result.objective[0], result.objective[-1]],
        "groups": dict(spec.sizes),
        "max_iter": int(max_iter),
        "seed": int(seed),
    }
    with atomic_output(out) as tmp:
        os.unlink(tmp)
        tmp.mkdir()
        save_state_dict(aligned, tmp / "foundation.safetensors")
        save_state_dict(dict(MeanStateDict([ref, aligned]).items()), tmp / "theta0.safetensors")
        save_permutation(result.perm, tmp / "permutation.safetensors", {"arch": arch})
        for name, state in zip(names, expert_states):
            save_state_dict(apply_permutation(spec, result.perm, materialize(state)), tmp / "experts" / f"{name}.safetensors")
        (tmp / "alignment.json").write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            out.rmdir()
    return record


def _same_layout(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], label: str) -> None:
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise CheckpointError(f"{label}: {what} (compared with the reference)")
    shape = getattr(state, "shape", None)
    for key in reference:
        got = tuple(shape(key)) if callable(shape) else tuple(state[key].shape)
        if got != tuple(reference[key].shape):
            raise CheckpointError(f"{label}: shape of {key!r} is {list(got)}, the reference has {list(reference[key].shape)}")
