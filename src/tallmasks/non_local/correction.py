"""Per-task correction of activation statistics (TACT, the non-local merging paper's method) and REPAIR.

At every correction site the merged model's per-channel activations x become ``scale * x + shift`` with
``scale = sigma_target / sigma_merged`` and ``shift = mu_target - scale * mu_merged``, so that their mean
and standard deviation on the calibration inputs equal the target's. TACT: the target of task t is its
expert on unlabeled inputs of task t, and each task keeps its own (scale, shift) set. REPAIR: one shared
target, the (weighted) mean of the experts' means and of their standard deviations on inputs pooled over
the tasks. Calibration is sequential in depth: a site's merged statistics are measured with every earlier
site already corrected.

Statistics are exact over all calibration inputs: per batch in float64, combined with Chan's parallel
update (population variance). The model runs in float32.

    corrector = Corrector(model)                       # installs the sites (pass-through until calibrated)
    target = corrector.statistics(images_t)            # with the expert's weights loaded
    ...                                                # load the merged weights
    corrector.calibrate("MNIST", images_t, target)     # sequential in depth
    with correction(model, "MNIST"):
        logits = head(model(x))
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.non_local.sites import Installed, Site, find_sites, install

log = logging.getLogger(__name__)

CORRECTION_FORMAT = "tallmasks-correction-v1"
_ROW_CHUNK_ELEMS = 1 << 22

#: per site: (scale, shift), float32 vectors over the site's channels
Correction = dict[str, tuple[torch.Tensor, torch.Tensor]]
Preprocess = Callable[[torch.Tensor], torch.Tensor]


class _Stop(Exception):
    """Ends a forward pass once the value it was run for has been seen."""


# ---------------------------------------------------------------------------------------------
# statistics


class Moments:
    """Per-channel count, mean and sum of squared deviations (float64), merged with Chan's update."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, value: torch.Tensor, channel_dim: int) -> None:
        rows = value.detach().movedim(channel_dim, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        step = max(1, _ROW_CHUNK_ELEMS // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            self._add(rows[start : start + step].to(torch.float64))

    def _add(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(dim=0)
        m2 = ((rows - mean) ** 2).sum(dim=0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        if self.mean is None:
            raise ConfigError("no activations were recorded at a correction site")
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


@dataclass
class SiteStats:
    """Per-channel mean and standard deviation (float64) of one site."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, moments: Moments) -> SiteStats:
        return cls(moments.mean.cpu(), moments.std.cpu())


Statistics = dict[str, SiteStats]


#: how REPAIR combines the experts' standard deviations: ``mean_std`` (the REPAIR paper: the mean of the
#: stds), or ``seed_code`` (what the non-local seed's ``merge_batch_stats`` computes, to show the difference:
#: ``reduce(lambda x, y: sqrt(x) + sqrt(y), variances) / N``, which takes square roots of the running sum
#: again at every step and is the mean of the stds for two experts only)
REPAIR_RULES = ("mean_std", "seed_code")


def repair_target(stats: Sequence[Statistics], weights: Sequence[float] | None = None, rule: str = "mean_std") -> Statistics:
    """REPAIR's target: per site, the weighted mean of the models' means and of their standard deviations
    (uniform weights by default; an interpolation (1 - t) A + t B uses weights (1 - t, t)); ``rule``
    ``seed_code`` combines the stds as the non-local seed's code does (uniform weights only)."""
    if not stats:
        raise ConfigError("repair_target needs the statistics of at least one model")
    if rule not in REPAIR_RULES:
        raise ConfigError(f"repair rule must be one of {', '.join(REPAIR_RULES)}, got {rule!r}")
    if rule == "seed_code" and weights is not None:
        raise ConfigError("the seed_code repair rule weighs every model alike (no weights)")
    weights = [1.0 / len(stats)] * len(stats) if weights is None else [float(w) for w in weights]
    if len(weights) != len(stats):
        raise ConfigError(f"{len(weights)} weights for {len(stats)} models")
    out = {}
    for site in stats[0]:
        mean = sum(w * s[site].mean for w, s in zip(weights, stats))
        if rule == "seed_code":
            # reduce over the variances v_i = std_i^2: acc = sqrt(v_1) + sqrt(v_2), then acc = sqrt(acc) + sqrt(v_i)
            acc = stats[0][site].std ** 2 if len(stats) == 1 else stats[0][site].std + stats[1][site].std  # reduce of one: v_1
            for s in stats[2:]:
                acc = acc.sqrt() + s[site].std
            std = acc / len(stats)
        else:
            std = sum(w * s[site].std for w, s in zip(weights, stats))
        out[site] = SiteStats(mean, std)
    return out


def solve(merged: SiteStats, target: SiteStats, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) mapping ``merged`` statistics onto ``target`` (a channel with zero spread is only shifted)."""
    spread = (merged.std**2 + eps).sqrt()
    scale = torch.where(spread > 0, target.std / torch.where(spread > 0, spread, 1.0), torch.ones_like(spread))
    shift = target.mean - scale * merged.mean
    return scale.to(torch.float32), shift.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# the corrector


def _broadcast(vector: torch.Tensor, value: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * value.dim()
    shape[channel_dim] = vector.numel()
    return vector.to(value.device, value.dtype).view(shape)


def _batches(images: torch.Tensor, batch_size: int, device: torch.device, preprocess: Preprocess | None) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        yield preprocess(batch) if preprocess is not None else batch


class Corrector:
    """The correction sites of one model, installed as hooks, and the per-task (scale, shift) sets."""

    def __init__(self, model: nn.Module, sites: Sequence[Site] | None = None, chain: Sequence[str] | None = None, embedding: bool = False):
        if getattr(model, "_tallmasks_corrector", None) is not None:
            raise ConfigError("the model already has correction sites installed (remove() them first)")
        self.model = model
        if sites is None:
            sites, found_chain = find_sites(model, embedding)
            chain = found_chain if chain is None else chain
        self.sites = list(sites)
        self.chain = list(chain or [])
        self.by_name = {site.name: site for site in self.sites}
        if len(self.by_name) != len(self.sites):
            raise ConfigError("correction sites are not unique")
        self.corrections: dict[str, Correction] = {}
        self._active: Correction | None = None
        self._placed: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._record: dict[str, Moments] | None = None
        self._record_after = False
        self._stop_at: str | None = None
        self._installed: list[Installed] = [install(model, site, self._callback(site)) for site in self.sites]
        model._tallmasks_corrector = self  # type: ignore[attr-defined]

    @property
    def active(self) -> Correction | None:
        """The correction the hooks apply now (None: none)."""
        return self._active

    @active.setter
    def active(self, value: Correction | None) -> None:
        self._active = value
        self._placed = {}

    def _pair(self, name: str, value: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The active (scale, shift) of site ``name``, shaped to broadcast over ``value`` (kept per device)."""
        pair = self._active.get(name) if self._active is not None else None
        if pair is None:
            return None
        key = (name, value.device, value.dtype)
        placed = self._placed.get(key)
        if placed is None or placed[0].dim() != value.dim():
            placed = self._placed[key] = (_broadcast(pair[0], value, dim), _broadcast(pair[1], value, dim))
        return placed

    # -- hooks --------------------------------------------------------------------------------

    def _callback(self, site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
        name, dim = site.name, site.channel_dim

        def fn(value: torch.Tensor) -> torch.Tensor:
            record = self._record
            if record is not None and not self._record_after and name in record:
                record[name].update(value, dim)
            pair = self._pair(name, value, dim)
            if pair is not None:
                value = value * pair[0] + pair[1]
            if record is not None and self._record_after and name in record:
                record[name].update(value, dim)
            if self._stop_at == name:
                raise _Stop
            return value

        return fn

    def remove(self) -> None:
        """Uninstall every site; the model behaves as before."""
        for handle in self._installed:
            handle.remove()
        self._installed = []
        if getattr(self.model, "_tallmasks_corrector", None) is self:
            del self.model._tallmasks_corrector

    @contextlib.contextmanager
    def use(self, task: str | None) -> Iterator[None]:
        """Apply task ``task``'s correction inside the block (None: no correction)."""
        if task is not None and task not in self.corrections:
            raise ConfigError(f"no correction calibrated for task {task!r} (known: {', '.join(self.corrections) or 'none'})")
        previous = self.active
        self.active = None if task is None else self.corrections[task]
        try:
            yield
        finally:
            self.active = previous

    def set(self, task: str, correction: Correction) -> None:
        """Attach a (loaded) correction to ``task``; its sites must be sites of this model."""
        unknown = sorted(set(correction) - set(self.by_name))
        if unknown:
            raise ConfigError(f"correction of {task!r} has site {unknown[0]!r} that the model lacks")
        self.corrections[task] = {k: (s.float().cpu(), t.float().cpu()) for k, (s, t) in correction.items()}

    # -- passes ---------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        for param in self.model.parameters():
            return param.device
        return torch.device("cpu")

    @torch.no_grad()
    def statistics(
        self,
        images: torch.Tensor,
        task: str | None = None,
        batch_size: int = 128,
        preprocess: Preprocess | None = None,
        after_correction: bool = True,
    ) -> Statistics:
        """Per-site statistics of the model's activations on ``images`` (one pass), with task ``task``'s
        correction applied (None: none); ``after_correction`` measures a site's corrected values."""
        moments = {name: Moments() for name in self.by_name}
        device = self._device()
        with self._evaluating(), self.use(task), self._recording(moments, after_correction):
            for batch in _batches(images, batch_size, device, preprocess):
                self.model(batch)
        return {name: SiteStats.of(m) for name, m in moments.items()}

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The model in eval mode inside the block (normalization layers use their running statistics)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def _recording(self, moments: dict[str, Moments], after: bool = False, stop_at: str | None = None) -> Iterator[None]:
        self._record, self._record_after, self._stop_at = moments, after, stop_at
        try:
            yield
        finally:
            self._record, self._record_after, self._stop_at = None, False, None

    @torch.no_grad()
    def calibrate(
        self,
        task: str,
        images: torch.Tensor,
        target: Statistics,
        batch_size: int = 128,
        preprocess: Preprocess | None = None,
        eps: float = 0.0,
    ) -> Correction:
        """Calibrate task ``task``'s correction of the model's current weights towards ``target``,
        sequentially in depth; returns it (and keeps it for :meth:`use`)."""
        missing = [name for name in self.by_name if name not in target]
        if missing:
            raise ConfigError(f"target statistics lack site {missing[0]!r}")
        if images.shape[0] == 0:
            raise ConfigError(f"no calibration images for task {task!r}")
        device = self._device()
        correction: Correction = {}
        self.corrections[task] = correction
        with self._evaluating():
            plan = self._plan(next(_batches(images, batch_size, device, preprocess)))

        def batches() -> Iterator[torch.Tensor]:
            return _batches(images, batch_size, device, preprocess)

        def solve_site(name: str, run: Callable[[], None]) -> None:
            moments = {name: Moments()}
            with self._recording(moments, stop_at=name):
                run()
            correction[name] = solve(SiteStats.of(moments[name]), target[name], eps)

        def full_pass() -> None:
            for batch in batches():
                with contextlib.suppress(_Stop):
                    self.model(batch)

        with self._evaluating(), self.use(task):
            for name in plan.prefix:
                solve_site(name, full_pass)
            cache = self._chain_inputs(batches()) if plan.stages else []
            for index, (path, names) in enumerate(zip(self.chain, plan.stages)):
                module = self.model.get_submodule(path)

                def replay(module=module, cache=cache) -> None:
                    for x in cache:
                        with contextlib.suppress(_Stop):
                            module(x.clone())  # a module may change its input in place

                produced = False
                for name in names:
                    if name != f"{path}:out" or index + 1 == len(plan.stages):
                        solve_site(name, replay)
                        continue
                    # the module's own output: one pass gives its statistics and the next module's inputs
                    moments = {name: Moments()}
                    with self._recording(moments):
                        outputs = [module(x.clone()) for x in cache]
                    correction[name] = solve(SiteStats.of(moments[name]), target[name], eps)
                    scale, shift = correction[name]
                    dim = self.by_name[name].channel_dim
                    cache = [y * _broadcast(scale, y, dim) + _broadcast(shift, y, dim) for y in outputs]
                    produced = True
                if index + 1 < len(plan.stages) and not produced:
                    cache = [module(x) for x in cache]
            cache = []
            for name in plan.suffix:
                solve_site(name, full_pass)
        return correction

    def _chain_inputs(self, batches: Iterator[torch.Tensor]) -> list[torch.Tensor]:
        """The input of the first chain module for every batch (earlier sites corrected)."""
        first = self.model.get_submodule(self.chain[0])
        captured: list[torch.Tensor] = []

        def grab(_module, args):
            captured.append(args[0])
            raise _Stop

        handle = first.register_forward_pre_hook(grab)
        try:
            for batch in batches:
                with contextlib.suppress(_Stop):
                    self.model(batch)
        finally:
            handle.remove()
        return captured

    def _plan(self, batch: torch.Tensor) -> _Plan:
        """Which sites run before, inside and after the chain modules (one probe pass); sorts the sites
        in forward order. Without a usable chain, every site is calibrated with full passes."""
        events: list[tuple[str, object]] = []
        handles = []
        links: dict[int, list[int]] = {}
        for index, path in enumerate(self.chain):
            module = self.model.get_submodule(path)

            def pre(_m, args, index=index):
                events.append(("enter", index))
                links.setdefault(index, []).append(id(args[0]))

            def post(_m, _args, output, index=index):
                events.append(("exit", index))
                links.setdefault(index, []).append(id(output))

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        probes = {name: _FiringProbe(name, events) for name in self.by_name}
        try:
            with self.use(None), self._recording(probes):  # type: ignore[arg-type]
                self.model(batch)
        finally:
            for handle in handles:
                handle.remove()
        fired = [name for kind, name in events if kind == "site"]
        for name in self.by_name:
            count = fired.count(name)
            if count != 1:
                raise ConfigError(f"correction site {name} ran {count} times in one forward pass (expected once)")
        order = {name: i for i, name in enumerate(fired)}
        self.sites.sort(key=lambda site: order[site.name])
        plan = _Plan.from_events(events, links, len(self.chain))
        if plan is None:
            log.debug("the chain modules do not run one after the other: calibrating with full passes")
            return _Plan(fired, [], [])
        return plan


class _FiringProbe(Moments):
    """Stands in for Moments during the probe pass: records when each site runs."""

    def __init__(self, name: str, events: list):
        super().__init__()
        self.name, self.events = name, events

    def update(self, value: torch.Tensor, channel_dim: int) -> None:
        self.events.append(("site", self.name))


@dataclass
class _Plan:
    """Sites calibrated with full passes before the chain, per chain module (replayed on cached inputs),
    and with full passes after it."""

    prefix: list[str]
    stages: list[list[str]]
    suffix: list[str]

    @classmethod
    def from_events(cls, events: list, links: dict[int, list[int]], length: int) -> _Plan | None:
        if length == 0:
            return cls([name for kind, name in events if kind == "site"], [], [])
        prefix: list[str] = []
        stages: list[list[str]] = [[] for _ in range(length)]
        suffix: list[str] = []
        expected = ("enter", 0)
        where: list[str] = prefix
        for kind, value in events:
            if kind == "site":
                if where is None:  # a site between two chain modules: they are not a chain
                    return None
                where.append(value)
                continue
            if (kind, value) != expected:
                return None
            if kind == "enter":
                where, expected = stages[value], ("exit", value)
            elif value + 1 < length:
                where, expected = None, ("enter", value + 1)
            else:
                where, expected = suffix, None
        if expected is not None:
            return None
        for index in range(length - 1):  # each module's output is the next one's input
            if len(links.get(index, ())) != 2 or links[index][1] != links.get(index + 1, [None])[0]:
                return None
        return cls(prefix, stages, suffix)


# ---------------------------------------------------------------------------------------------
# switching, folding, storing


def corrector_of(model: nn.Module) -> Corrector:
    """The Corrector installed on ``model``."""
    corrector = getattr(model, "_tallmasks_corrector", None)
    if corrector is None:
        raise ConfigError("the model has no correction sites installed (build a Corrector(model) first)")
    return corrector


@contextlib.contextmanager
def correction(model: nn.Module, task: str | None) -> Iterator[None]:
    """``with correction(model, task):`` runs ``model`` with task ``task``'s correction (None: none)."""
    with corrector_of(model).use(task):
        yield


def _scaled_rows(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    view = scale.view(-1, *([1] * (tensor.dim() - 1)))
    return (tensor.to(torch.float32) * view).to(tensor.dtype)


def _scaled_shifted(tensor: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return (tensor.to(torch.float32) * scale + shift).to(tensor.dtype)


def fold_correction(
    state: Mapping[str, torch.Tensor], sites: Sequence[Site], corr: Correction
) -> tuple[dict[str, torch.Tensor], Correction]:
    """Fold a correction into the weights before each site: returns (new state dict, the part of the
    correction that cannot be folded: a ViT block's residual output, or a layer without the bias or
    affine parameters a shift needs). The new weights with the leftover applied compute what the
    corrected model computes."""
    out = dict(state)
    leftover: Correction = {}
    for site in sites:
        if site.name not in corr:
            continue
        scale, shift = (v.to(torch.float32) for v in corr[site.name])
        owner = site.module if site.fold_module is None else site.fold_module
        prefix = owner + "." if owner else ""
        if not _fold_one(out, site.fold, prefix, scale, shift):
            leftover[site.name] = corr[site.name]
    return out, leftover


def _fold_one(out: dict[str, torch.Tensor], kind: str | None, prefix: str, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    key = prefix.__add__
    if kind in ("layer", "affine"):
        weight, bias = key("weight"), key("bias")
        if weight not in out or (bias not in out and bool(shift.any())):
            return False
        out[weight] = _scaled_rows(out[weight], scale)
        if bias in out:
            out[bias] = _scaled_shifted(out[bias], scale, shift)
        return True
    if kind == "vit_embed":
        out[key("conv1.weight")] = _scaled_rows(out[key("conv1.weight")], scale)
        if key("conv1.bias") in out:
            out[key("conv1.bias")] = _scaled_shifted(out[key("conv1.bias")], scale, torch.zeros_like(shift))
        out[key("class_embedding")] = _scaled_shifted(out[key("class_embedding")], scale, torch.zeros_like(shift))
        out[key("positional_embedding")] = _scaled_shifted(out[key("positional_embedding")], scale, shift)
        return True
    if kind == "attn_value":  # softmax rows sum to 1: a per-channel affine of the context is one of V
        weight, bias = out[key("in_proj_weight")].clone(), out[key("in_proj_bias")].clone()
        width = scale.numel()
        weight[2 * width :] = _scaled_rows(weight[2 * width :], scale)
        bias[2 * width :] = _scaled_shifted(bias[2 * width :], scale, shift)
        out[key("in_proj_weight")], out[key("in_proj_bias")] = weight, bias
        return True
    return False


def save_correction(path: str | Path, corr: Correction, metadata: Mapping[str, str] | None = None) -> None:
    """Save one task's correction as a small safetensors file (``<site>/scale``, ``<site>/shift``), atomically."""
    from tallmasks.io.checkpoints import save_state_dict

    tensors = {}
    for site, (scale, shift) in corr.items():
        tensors[f"{site}/scale"] = scale.detach().float().cpu().contiguous()
        tensors[f"{site}/shift"] = shift.detach().float().cpu().contiguous()
    save_state_dict(tensors, path, metadata={"format": CORRECTION_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}})


def load_correction(path: str | Path) -> tuple[Correction, dict[str, str]]:
    """(correction, metadata) of a file written by :func:`save_correction`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such correction file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable correction file ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    if metadata.get("format") != CORRECTION_FORMAT:
        raise CheckpointError(f"{path}: not a correction file (format {metadata.get('format')!r})")
    corr: Correction = {}
    for key in tensors:
        site, _, part = key.rpartition("/")
        if part == "scale":
            if f"{site}/shift" not in tensors:
                raise CheckpointError(f"{path}: {site} has a scale but no shift")
            corr[site] = (tensors[key], tensors[f"{site}/shift"])
    return corr, metadata


# ---------------------------------------------------------------------------------------------
# whole procedures on state dicts (experiments, the offline demo)


StateSource = Mapping[str, torch.Tensor]


def load_weights(model: nn.Module, state: StateSource) -> None:
    """Copy ``state`` into ``model``'s parameters and buffers (keys must match)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"state dict lacks key {missing[0]!r} of the model")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state[key].to(target.dtype))


def _per_task(merged: StateSource | Mapping[str, StateSource], tasks: Sequence[str]) -> dict[str, StateSource]:
    """``merged`` as one state dict per task (a shared merged model, or one per task)."""
    if all(t in merged and isinstance(merged[t], Mapping) for t in tasks):
        return {t: merged[t] for t in tasks}  # type: ignore[misc]
    return dict.fromkeys(tasks, merged)  # type: ignore[misc]


def tact(
    model: nn.Module,
    merged: StateSource | Mapping[str, StateSource],
    experts: Mapping[str, StateSource],
    images: Mapping[str, torch.Tensor],
    batch_size: int = 128,
    preprocess: Preprocess | None = None,
    eps: float = 0.0,
) -> dict[str, Correction]:
    """Per-task corrections: task t's merged model (``merged``, or ``merged[t]`` with TALL masks)
    calibrated towards expert t's statistics on ``images[t]`` (unlabeled inputs of task t)."""
    corrector = _corrector(model)
    tasks = list(experts)
    merged_of = _per_task(merged, tasks)
    out = {}
    for task in tasks:
        load_weights(model, experts[task])
        target = corrector.statistics(images[task], batch_size=batch_size, preprocess=preprocess)
        load_weights(model, merged_of[task])
        out[task] = corrector.calibrate(task, images[task], target, batch_size, preprocess, eps)
    return out


def repair(
    model: nn.Module,
    merged: StateSource | Mapping[str, StateSource],
    experts: Mapping[str, StateSource],
    images: Mapping[str, torch.Tensor],
    weights: Sequence[float] | None = None,
    batch_size: int = 128,
    preprocess: Preprocess | None = None,
    eps: float = 0.0,
    rule: str = "mean_std",
) -> dict[str, Correction]:
    """REPAIR: one target from the experts' statistics on the inputs of every task pooled (mean of
    their means and of their standard deviations, ``weights`` per expert; ``rule``: see
    :data:`REPAIR_RULES`), one correction per merged model."""
    corrector = _corrector(model)
    tasks = list(experts)
    pooled = torch.cat([images[t] for t in tasks])
    stats = []
    for task in tasks:
        load_weights(model, experts[task])
        stats.append(corrector.statistics(pooled, batch_size=batch_size, preprocess=preprocess))
    target = repair_target(stats, weights, rule)
    merged_of = _per_task(merged, tasks)
    out: dict[str, Correction] = {}
    done: dict[int, Correction] = {}
    for task in tasks:
        source = merged_of[task]
        if id(source) not in done:
            load_weights(model, source)
            done[id(source)] = corrector.calibrate(task, pooled, target, batch_size, preprocess, eps)
        out[task] = done[id(source)]
        corrector.corrections[task] = out[task]
    return out


def std_ratios(
    model: nn.Module,
    merged: StateSource | Mapping[str, StateSource],
    experts: Mapping[str, StateSource],
    images: Mapping[str, torch.Tensor],
    batch_size: int = 128,
    preprocess: Preprocess | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """The variance-collapse measurement: per task and site, the mean over channels of the merged model's
    activation std divided by the expert's, on ``images[t]``, before and after task t's correction
    (``{"before": {site: r}, "after": {site: r}}``; "after" only for tasks with a calibrated correction)."""
    corrector = _corrector(model)
    tasks = list(experts)
    merged_of = _per_task(merged, tasks)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task in tasks:
        load_weights(model, experts[task])
        expert = corrector.statistics(images[task], batch_size=batch_size, preprocess=preprocess)
        load_weights(model, merged_of[task])
        out[task] = {"before": _ratios(corrector.statistics(images[task], batch_size=batch_size, preprocess=preprocess), expert)}
        if task in corrector.corrections:
            after = corrector.statistics(images[task], task, batch_size=batch_size, preprocess=preprocess)
            out[task]["after"] = _ratios(after, expert)
    return out


def _ratios(merged: Statistics, expert: Statistics) -> dict[str, float]:
    out = {}
    for site, stats in merged.items():
        alive = expert[site].std > 0
        ratio = stats.std[alive] / expert[site].std[alive]
        out[site] = float(ratio.mean()) if ratio.numel() else math.nan
    return out


def _corrector(model: nn.Module) -> Corrector:
    existing = getattr(model, "_tallmasks_corrector", None)
    return existing if existing is not None else Corrector(model)
