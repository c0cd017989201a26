"""Permutation specs: which axes of which parameters share a permutation of hidden units.

A permutation of the hidden units of a network, applied consistently to every parameter that reads
or writes those units, leaves the network's function unchanged. A :class:`PermutationSpec` names the
permutation groups and, for each state-dict key, the group acting on each axis. Specs are built from
state dicts alone (no model object), for three families:

- ``mlp``: a chain of linear or convolution layers with optional normalization layers in between
  (MLPs, plain CNNs with global pooling, the demo VGG); the last layer's outputs are not permuted, or
  with ``embedding`` they are the output embedding's group, which the task heads' inputs follow;
- ``cnn``: residual CNNs in torchvision's ResNet layout (BasicBlock or Bottleneck), batch-norm weights,
  biases and running statistics included; one permutation per residual stream (stage);
- ``vit``: open_clip's VisionTransformer: one permutation of the residual stream for the whole network,
  one per block for attention (Q, K and V share it; heads move as wholes and units move within heads)
  and one per block for the MLP hidden units. The output embedding (``proj`` columns) is not permuted,
  so zero-shot heads stay valid.

Convention: ``perm[i]`` is the old index of new unit ``i`` (``permuted = tensor.index_select(axis, perm)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from tallmasks.core.errors import CheckpointError, ConfigError

ARCHITECTURES = ("mlp", "cnn", "vit")
VIT_DEFAULT_HEAD_WIDTH = 64  # open_clip's default head width


@dataclass(frozen=True)
class Axis:
    """An axis permuted by group ``perm``; ``repeats`` > 1: the axis holds that many consecutive blocks,
    each permuted the same way (open_clip's packed Q, K, V projection)."""

    perm: str
    repeats: int = 1


AxisSpec = tuple["Axis | None", ...]


@dataclass
class PermutationSpec:
    """Permutation groups (name -> size), the group on each axis of each key, and head structure."""

    axes: dict[str, AxisSpec]
    sizes: dict[str, int]
    heads: dict[str, int] = field(default_factory=dict)  # group -> number of heads (units move within heads)

    def __post_init__(self) -> None:
        self.members: dict[str, list[tuple[str, int, int]]] = {p: [] for p in self.sizes}
        for key, axes in self.axes.items():
            for dim, axis in enumerate(axes):
                if axis is not None:
                    self.members[axis.perm].append((key, dim, axis.repeats))
        for group, heads in self.heads.items():
            if self.sizes[group] % heads:
                raise ConfigError(f"permutation group {group}: {self.sizes[group]} units do not split into {heads} heads")

    @property
    def groups(self) -> list[str]:
        return list(self.sizes)

    def check(self, state: Mapping[str, torch.Tensor], label: str = "checkpoint") -> None:
        """Every key of the spec is present with axes of the sizes the spec expects."""
        for key, axes in self.axes.items():
            if key not in state:
                raise CheckpointError(f"{label}: missing key {key!r}")
            shape = _shape(state, key)
            if len(shape) != len(axes):
                raise CheckpointError(f"{label}: {key!r} has {len(shape)} axes, the permutation spec expects {len(axes)}")
            for dim, axis in enumerate(axes):
                if axis is not None and shape[dim] != self.sizes[axis.perm] * axis.repeats:
                    raise CheckpointError(
                        f"{label}: axis {dim} of {key!r} has size {shape[dim]}, expected {self.sizes[axis.perm] * axis.repeats}"
                    )


Permutation = dict[str, torch.Tensor]


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    shape = getattr(state, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(state[key].shape)


# ---------------------------------------------------------------------------------------------
# applying permutations


def permute_axis(tensor: torch.Tensor, dim: int, perm: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """``tensor`` with axis ``dim`` permuted (each of its ``repeats`` blocks the same way)."""
    if repeats == 1:
        return tensor.index_select(dim, perm.to(tensor.device))
    n = perm.numel()
    shape = tensor.shape
    blocks = tensor.reshape(*shape[:dim], repeats, n, *shape[dim + 1 :])
    return blocks.index_select(dim + 1, perm.to(tensor.device)).reshape(shape)


def permute_tensor(spec: PermutationSpec, perm: Permutation, key: str, tensor: torch.Tensor, skip: int | None = None) -> torch.Tensor:
    """``tensor`` (the value of ``key``) with every axis of the spec permuted, except axis ``skip``."""
    for dim, axis in enumerate(spec.axes.get(key, ())):
        if axis is not None and dim != skip:
            tensor = permute_axis(tensor, dim, perm[axis.perm], axis.repeats)
    return tensor


def apply_permutation(spec: PermutationSpec, perm: Permutation, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with ``perm`` applied; keys outside the spec are kept as they are."""
    return {key: permute_tensor(spec, perm, key, state[key]) for key in state}


class PermutedStateDict(Mapping[str, torch.Tensor]):
    """A read-only view of a (lazy) state dict with a permutation applied to each tensor on access."""

    def __init__(self, base: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Permutation):
        self.base, self.spec, self.perm = base, spec, perm
        self.path = getattr(base, "path", None)

    def __getitem__(self, key: str) -> torch.Tensor:
        return permute_tensor(self.spec, self.perm, key, self.base[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, key: str) -> tuple[int, ...]:
        return _shape(self.base, key)

    def dtype(self, key: str) -> torch.dtype:
        dtype = getattr(self.base, "dtype", None)
        return dtype(key) if callable(dtype) else self.base[key].dtype


def identity_permutation(spec: PermutationSpec) -> Permutation:
    return {group: torch.arange(size) for group, size in spec.sizes.items()}


def invert_permutation(perm: Permutation) -> Permutation:
    """The permutation that undoes ``perm``."""
    return {group: torch.argsort(p) for group, p in perm.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Permutation:
    """A random permutation of every group; head-structured groups permute heads, then units within each head."""
    out = {}
    for group, size in spec.sizes.items():
        heads = spec.heads.get(group)
        if heads is None:
            out[group] = torch.randperm(size, generator=generator)
            continue
        width = size // heads
        order = torch.randperm(heads, generator=generator)
        out[group] = torch.cat([torch.randperm(width, generator=generator) + width * int(h) for h in order])
    return out


def check_permutation(spec: PermutationSpec, perm: Permutation) -> None:
    """Every group is present and is a permutation that respects its head structure."""
    for group, size in spec.sizes.items():
        if group not in perm:
            raise ConfigError(f"permutation lacks group {group!r}")
        p = perm[group].to(torch.int64)
        if p.numel() != size or not torch.equal(torch.sort(p).values, torch.arange(size)):
            raise ConfigError(f"permutation of group {group!r} is not a permutation of {size} units")
        heads = spec.heads.get(group)
        if heads is not None:
            width = size // heads
            blocks = p.view(heads, width) // width
            if not bool((blocks == blocks[:, :1]).all()):
                raise ConfigError(f"permutation of group {group!r} splits a head")


# ---------------------------------------------------------------------------------------------
# specs per architecture


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _module_of(key: str) -> tuple[str, str]:
    module, _, name = key.rpartition(".")
    return module, name


def mlp_spec(state: Mapping[str, torch.Tensor], prefix: str = "", embedding: bool = False) -> PermutationSpec:
    """A chain of linear/conv layers (weights of 2+ axes) in natural key order, with optional normalization
    layers (1-D weights) after them; each layer's outputs get a group, except the last layer's, which with
    ``embedding`` is the output embedding's group (:data:`EMBEDDING_GROUP`, applied to the task heads too)."""
    modules: dict[str, dict[str, str]] = {}
    others: list[str] = []
    for key in state:
        if not key.startswith(prefix):
            continue
        module, name = _module_of(key)
        modules.setdefault(module, {})[name] = key
    order = sorted(modules, key=_natural)
    layers = [m for m in order if "weight" in modules[m] and len(_shape(state, modules[m]["weight"])) >= 2]
    if not layers:
        raise CheckpointError("mlp spec: no linear or convolution weights found")
    axes: dict[str, AxisSpec] = {}
    sizes: dict[str, int] = {}
    current: str | None = None  # group on the outputs of the latest layer
    width: int | None = None
    for module in order:
        names = modules[module]
        weight = names.get("weight")
        if weight is not None and module in layers:
            shape = _shape(state, weight)
            if width is not None and shape[1] != width:
                raise CheckpointError(
                    f"mlp spec: {weight!r} takes {shape[1]} inputs but the previous layer gives {width}; "
                    "the layers are not one chain in key order"
                )
            last = module == layers[-1]
            group = (EMBEDDING_GROUP if embedding else None) if last else f"P_{module or 'layer'}"
            if group is not None:
                sizes[group] = shape[0]
            out_axis = Axis(group) if group else None
            in_axis = Axis(current) if current else None
            axes[weight] = (out_axis, in_axis, *([None] * (len(shape) - 2)))
            for name, key in names.items():
                if name != "weight":
                    axes[key] = _vector_axes(state, key, out_axis, shape[0])
            current, width = group, shape[0]
            continue
        for _name, key in names.items():  # a normalization layer (or loose vectors) on the current group
            shape = _shape(state, key)
            axis = Axis(current) if current else None
            if len(shape) == 1 and shape[0] == width:
                axes[key] = (axis,)
            elif len(shape) == 0:
                axes[key] = ()
            else:
                others.append(key)
    if others:
        raise CheckpointError(f"mlp spec: cannot place {others[0]!r} in the chain of layers")
    return PermutationSpec(axes, sizes)


def _vector_axes(state, key: str, axis: Axis | None, width: int) -> AxisSpec:
    shape = _shape(state, key)
    if len(shape) == 0:
        return ()
    if len(shape) != 1 or shape[0] != width:
        raise CheckpointError(f"permutation spec: {key!r} of shape {list(shape)} does not fit its layer's {width} units")
    return (axis,)


_BN_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def resnet_spec(state: Mapping[str, torch.Tensor], prefix: str = "") -> PermutationSpec:
    """torchvision's ResNet layout: conv1/bn1, layer<L>.<B>.conv<k>/bn<k>, downsample.0/1, fc."""
    axes: dict[str, AxisSpec] = {}
    sizes: dict[str, int] = {}
    used: set[str] = set()

    def conv(name: str, p_in: str | None, p_out: str | None) -> None:
        key = f"{prefix}{name}.weight"
        if key not in state:
            raise CheckpointError(f"cnn spec: missing {key!r} (expected torchvision's ResNet layout)")
        shape = _shape(state, key)
        if p_out is not None:
            sizes.setdefault(p_out, shape[0])
        axes[key] = (Axis(p_out) if p_out else None, Axis(p_in) if p_in else None, *([None] * (len(shape) - 2)))
        used.add(key)
        bias = f"{prefix}{name}.bias"
        if bias in state:
            axes[bias] = (Axis(p_out) if p_out else None,)
            used.add(bias)

    def norm(name: str, p: str) -> None:
        found = False
        for part in _BN_NAMES:
            key = f"{prefix}{name}.{part}"
            if key in state:
                axes[key] = () if len(_shape(state, key)) == 0 else (Axis(p),)
                used.add(key)
                found = True
        if not found:
            raise CheckpointError(f"cnn spec: missing normalization layer {prefix}{name}")

    conv("conv1", None, "P_stem")
    norm("bn1", "P_stem")
    stream = "P_stem"
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"layer(\d+)\.", k))})
    if not layers:
        raise CheckpointError("cnn spec: no layer<N>.* keys (expected torchvision's ResNet layout)")
    for layer in layers:
        blocks = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + rf"layer{layer}\.(\d+)\.", k))})
        for block in blocks:
            name = f"layer{layer}.{block}"
            convs = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix + name) + r"\.conv(\d+)\.", k))})
            if f"{prefix}{name}.downsample.0.weight" in state:
                new_stream = f"P_layer{layer}"
                conv(f"{name}.downsample.0", stream, new_stream)
                norm(f"{name}.downsample.1", new_stream)
            else:
                new_stream = stream
            p_in = stream
            for index in convs:
                p_out = new_stream if index == convs[-1] else f"P_{name}.inner{index}"
                conv(f"{name}.conv{index}", p_in, p_out)
                norm(f"{name}.bn{index}", p_out)
                p_in = p_out
            stream = new_stream
    conv("fc", stream, None)
    unknown = sorted(k for k in state if k.startswith(prefix) and k not in used)
    if unknown:
        raise CheckpointError(f"cnn spec: unexpected key {unknown[0]!r} for torchvision's ResNet layout")
    return PermutationSpec(axes, sizes)


def vit_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The key prefix of an open_clip VisionTransformer in a state dict (e.g. ``model.visual.``)."""
    found = [k[: -len("class_embedding")] for k in state if k.endswith("class_embedding")]
    if len(found) != 1:
        raise CheckpointError("vit spec: expected exactly one open_clip VisionTransformer (a '...class_embedding' key)")
    return found[0]


#: the permutation group of the output embedding (``proj``'s columns) in ``vit_spec(..., embedding=True)``
EMBEDDING_GROUP = "P_embed"


def vit_spec(
    state: Mapping[str, torch.Tensor], heads: int | None = None, prefix: str | None = None, embedding: bool = False
) -> PermutationSpec:
    """open_clip VisionTransformer; ``heads`` per block (default: width // 64, open_clip's head width).
    ``embedding``: the output embedding (``proj``'s columns) is a permutation group of its own
    (:data:`EMBEDDING_GROUP`), to be applied to the input axis of the task heads of the permuted model too."""
    prefix = vit_prefix(state) if prefix is None else prefix
    width = _shape(state, prefix + "class_embedding")[0]
    if heads is None:
        heads = max(1, width // VIT_DEFAULT_HEAD_WIDTH)
    heads = int(heads)
    if heads < 1 or width % heads:
        raise ConfigError(f"vit spec: {heads} heads do not divide the width {width}")
    R = Axis("P_residual")
    axes: dict[str, AxisSpec] = {}
    sizes = {"P_residual": width}
    head_groups: dict[str, int] = {}
    fixed = {
        "class_embedding": (R,),
        "positional_embedding": (None, R),
        "ln_pre.weight": (R,),
        "ln_pre.bias": (R,),
        "ln_post.weight": (R,),
        "ln_post.bias": (R,),
        "proj": (R, None),
        "conv1.weight": (R, None, None, None),
        "conv1.bias": (R,),
    }
    block_re = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key in state:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in fixed:
            axes[key] = fixed[name]
            continue
        match = block_re.match(name)
        if match is None:
            raise CheckpointError(f"vit spec: unexpected key {key!r} for open_clip's VisionTransformer")
        block, rest = match.group(1), match.group(2)
        attn, mlp = f"P_attn{block}", f"P_mlp{block}"
        per_block = {
            "ln_1.weight": (R,),
            "ln_1.bias": (R,),
            "ln_2.weight": (R,),
            "ln_2.bias": (R,),
            "ls_1.gamma": (R,),
            "ls_2.gamma": (R,),
            "attn.in_proj_weight": (Axis(attn, 3), R),
            "attn.in_proj_bias": (Axis(attn, 3),),
            "attn.out_proj.weight": (R, Axis(attn)),
            "attn.out_proj.bias": (R,),
            "mlp.c_fc.weight": (Axis(mlp), R),
            "mlp.c_fc.bias": (Axis(mlp),),
            "mlp.c_proj.weight": (R, Axis(mlp)),
            "mlp.c_proj.bias": (R,),
        }
        if rest not in per_block:
            raise CheckpointError(f"vit spec: unexpected key {key!r} for open_clip's VisionTransformer blocks")
        axes[key] = per_block[rest]
        if rest == "attn.in_proj_weight":
            sizes[attn] = _shape(state, key)[0] // 3
            head_groups[attn] = heads
        elif rest == "mlp.c_fc.weight":
            sizes[mlp] = _shape(state, key)[0]
    if embedding:
        if prefix + "proj" not in state:
            raise CheckpointError(f"vit spec: no {prefix}proj to permute the output embedding of")
        axes[prefix + "proj"] = (R, Axis(EMBEDDING_GROUP))
        sizes[EMBEDDING_GROUP] = _shape(state, prefix + "proj")[1]
    spec = PermutationSpec(axes, sizes, head_groups)
    spec.check(state)
    return spec


def permute_head(weight: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """A task head's weight (classes x embedding) for a model whose output embedding was permuted by
    ``perm`` (its :data:`EMBEDDING_GROUP`): the same logits on the permuted features."""
    if EMBEDDING_GROUP not in perm:
        return weight
    return permute_axis(weight, 1, perm[EMBEDDING_GROUP])


def heads_of_model(model_name: str) -> int:
    """Attention heads per block of an open_clip model's image tower (width / head_width of its config)."""
    import open_clip

    from tallmasks.models.encoder import register_demo_model

    register_demo_model()
    config = open_clip.get_model_config(model_name)
    if not config:
        raise ConfigError(f"unknown open_clip model {model_name!r}")
    vision = config["vision_cfg"]
    return int(vision["width"]) // int(vision.get("head_width", VIT_DEFAULT_HEAD_WIDTH))


def spec_for(arch: str, state: Mapping[str, torch.Tensor], heads: int | None = None) -> PermutationSpec:
    """The permutation spec of a state dict of architecture family ``arch`` (mlp, cnn or vit)."""
    if arch == "mlp":
        return mlp_spec(state)
    if arch == "cnn":
        return resnet_spec(state)
    if arch == "vit":
        return vit_spec(state, heads)
    raise ConfigError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


def alignment_objective(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], perm: Permutation) -> float:
    """sum over the spec's keys of <a[key], permuted b[key]> (float64): what weight matching maximizes."""
    total = 0.0
    for key in spec.axes:
        if math.prod(_shape(a, key)) == 0 or not a[key].dtype.is_floating_point:
            continue
        pb = permute_tensor(spec, perm, key, b[key])
        total += float((a[key].double() * pb.double()).sum())
    return total
