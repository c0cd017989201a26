"""Correction sites: where per-channel activation statistics are measured and corrected.

- open_clip VisionTransformer (as in the non-local merging paper's ViT): after the patch and positional
  embeddings (the input of ``ln_pre``), the attention output before its output projection, the MLP
  input (the output of ``ln_2``), the MLP hidden units before the activation (the output of ``c_fc``)
  and each block's output after the residual. Channels are the last axis of the tokens.
  With ``embedding``, also the output embedding (the VisionTransformer's output, after ``ln_post`` and
  ``proj``), close to where the seed's VGG corrects its image features before the heads (it corrects them
  after their L2 normalization; here the heads normalize after the correction).
- any other model (MLPs, CNNs): after every linear or convolution layer before its activation, i.e. the
  output of the layer, or of the normalization layer that directly follows it (registered next to it);
  the last linear layer (the final projection) included. Channels are axis 1 of conv maps. For the demo
  VGG (``tallmasks-demo-vgg``) these are the seed VGG's sites: every convolution's layer norm, both dense
  layers and the output embedding (the seed corrects it after its L2 normalization, here before).

A site is named ``<module path>:<where>`` with ``where`` one of ``in`` (the module's input), ``out``
(its output) or ``context`` (the attention output before ``out_proj``, inside nn.MultiheadAttention).
Each site knows how its (scale, shift) folds into the weights before it, when it can.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tallmasks.core.errors import ConfigError
from tallmasks.models.vgg import ChannelLayerNorm

#: how a site's correction folds into the weights: linear/conv output, norm affine, the ViT embeddings,
#: the attention's V projection; None: not foldable (a ViT block's residual output)
FOLD_KINDS = ("layer", "affine", "vit_embed", "attn_value")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNEL_FIRST_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    ChannelLayerNorm,  # the demo VGG's layer norm over a conv map's channels
)
_NORMS = (*_CHANNEL_FIRST_NORMS, nn.LayerNorm)


@dataclass(frozen=True)
class Site:
    """One correction site of a model."""

    module: str  # path of the module in the model ("" for the root)
    where: str  # "in", "out" or "context"
    channel_dim: int  # axis of the channels (-1: tokens/features; 1: conv maps)
    fold: str | None  # one of FOLD_KINDS, or None
    fold_module: str | None = None  # module whose parameters absorb the correction (None: ``module``)

    @property
    def name(self) -> str:
        return f"{self.module}:{self.where}"


def _child(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def find_vision_transformer(model: nn.Module) -> str | None:
    """Path of the open_clip VisionTransformer inside ``model`` (None when there is none)."""
    for path, module in model.named_modules():
        if all(hasattr(module, attr) for attr in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_pre")):
            return path
    return None


def vit_sites(model: nn.Module, visual: str, embedding: bool = False) -> tuple[list[Site], list[str]]:
    """The ViT's sites in forward order and its chain of residual blocks; ``embedding`` adds the output
    embedding (the VisionTransformer's output, after ``proj``: what the heads read). Not ``ln_post``'s output:
    open_clip applies it to every token before pooling, so its statistics would be mostly the patch tokens'."""
    vit = model.get_submodule(visual)
    blocks = getattr(vit.transformer, "resblocks", None)
    if blocks is None:
        raise ConfigError(f"{visual}: an open_clip VisionTransformer without transformer.resblocks is not supported")
    sites = [Site(_child(visual, "ln_pre"), "in", -1, "vit_embed", visual)]
    chain = []
    for i, block in enumerate(blocks):
        path = _child(visual, f"transformer.resblocks.{i}")
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not hasattr(block, "ln_2") or not hasattr(block, "mlp"):
            raise ConfigError(f"{path}: only open_clip's ResidualAttentionBlock with nn.MultiheadAttention is supported")
        sites += [
            Site(f"{path}.attn", "context", -1, "attn_value"),
            Site(f"{path}.ln_2", "out", -1, "affine"),
            Site(f"{path}.mlp.c_fc", "out", -1, "layer"),
            Site(path, "out", -1, None),
        ]
        chain.append(path)
    if embedding:
        sites.append(Site(visual, "out", -1, None))
    return sites, chain


def generic_sites(model: nn.Module) -> list[Site]:
    """After every linear/conv layer (or the normalization layer registered right after it), in
    depth-first registration order."""
    next_sibling: dict[str, tuple[str, nn.Module] | None] = {}
    for parent_path, parent in model.named_modules():
        children = list(parent.named_children())
        for index, (name, _child_module) in enumerate(children):
            following = children[index + 1] if index + 1 < len(children) else None
            next_sibling[_child(parent_path, name)] = (_child(parent_path, following[0]), following[1]) if following else None
    sites = []
    for path, layer in model.named_modules():
        if not isinstance(layer, (nn.Linear, *_CONV)):
            continue
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        following = next_sibling.get(path)
        if following is not None and isinstance(following[1], _NORMS) and _norm_width(following[1]) == channels:
            norm_path, norm = following
            dim = 1 if isinstance(norm, _CHANNEL_FIRST_NORMS) else -1
            sites.append(Site(norm_path, "out", dim, "affine" if _has_affine(norm) else None))
        else:
            sites.append(Site(path, "out", 1 if isinstance(layer, _CONV) else -1, "layer"))
    if not sites:
        raise ConfigError("no correction sites found: the model has no linear or convolution layers")
    return sites


def _norm_width(norm: nn.Module) -> int | None:
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[-1] if len(norm.normalized_shape) == 1 else None
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    return getattr(norm, "num_features", None)


def _has_affine(norm: nn.Module) -> bool:
    return getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None


def find_sites(model: nn.Module, embedding: bool = False) -> tuple[list[Site], list[str]]:
    """(sites, chain): a ViT's sites and blocks when the model holds an open_clip VisionTransformer
    (``embedding``: with the output embedding's sites), else the generic linear/conv sites (no chain; their
    last linear layer is the output embedding already)."""
    visual = find_vision_transformer(model)
    if visual is not None:
        return vit_sites(model, visual, embedding)
    return generic_sites(model), []


def site_from_name(model: nn.Module, name: str) -> Site:
    """The site called ``name`` in ``model`` (as found by :func:`find_sites`)."""
    sites, _ = find_sites(model, embedding=True)  # every site a correction may name
    for site in sites:
        if site.name == name:
            return site
    raise ConfigError(f"model has no correction site {name!r}")


# ---------------------------------------------------------------------------------------------
# installing a callback at a site


SiteFn = Callable[[torch.Tensor], torch.Tensor]


class Installed:
    """Handles of one installed site callback; ``remove()`` restores the model."""

    def __init__(self, undo: Callable[[], None]):
        self._undo = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def install(model: nn.Module, site: Site, fn: SiteFn) -> Installed:
    """Make every forward pass route the site's value through ``fn`` (which may replace it)."""
    module = model.get_submodule(site.module)
    if site.where == "out":
        handle = module.register_forward_hook(lambda _m, _args, output: fn(output))
        return Installed(handle.remove)
    if site.where == "in":
        handle = module.register_forward_pre_hook(lambda _m, args: (fn(args[0]), *args[1:]))
        return Installed(handle.remove)
    if site.where == "context":
        if not isinstance(module, nn.MultiheadAttention):
            raise ConfigError(f"{site.module}: a 'context' site needs nn.MultiheadAttention")
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise ConfigError(f"{site.module}: only packed self-attention without bias_k or zero attention is supported")
        had_own = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        module.forward = types.MethodType(_attention_with_site(fn), module)

        def undo() -> None:
            if had_own:
                module.forward = previous
            else:
                del module.forward

        return Installed(undo)
    raise ConfigError(f"unknown site position {site.where!r}")


def _attention_with_site(fn: SiteFn):
    """nn.MultiheadAttention.forward for self-attention, with ``fn`` on the heads' concatenated output."""

    def forward(
        self: nn.MultiheadAttention,
        query,
        key=None,
        value=None,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if (key is not None and key is not query) or (value is not None and value is not query) or key_padding_mask is not None:
            raise ConfigError("attention correction sites support self-attention without a padding mask only")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, width = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        mask = attn_mask
        if mask is not None and mask.dim() == 3:
            mask = mask.view(batch, heads, length, length)
        dropout = self.dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=bool(is_causal))
        context = fn(context.transpose(1, 2).reshape(batch, length, width))
        out = F.linear(context, self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    return forward
