"""Hugging Face ``transformers`` CLIP state dicts <-> our open_clip layout, key by key and losslessly.

transformers (CLIPModel, CLIPVisionModel[WithProjection]; keys under ``vision_model.`` / ``text_model.``,
or bare vision keys as transformers 5 saves a CLIPVisionModel) -> open_clip CLIP (``visual.*`` and the
text tower), under a prefix (``model.`` as in our image encoder's checkpoints):

    embeddings.class_embedding             visual.class_embedding
    embeddings.patch_embedding.weight      visual.conv1.weight
    embeddings.position_embedding.weight   visual.positional_embedding
    pre_layrnorm / post_layernorm          visual.ln_pre / visual.ln_post
    encoder.layers.i.self_attn.{q,k,v}_proj  transformer.resblocks.i.attn.in_proj_{weight,bias}  (q, k, v stacked)
    encoder.layers.i.self_attn.out_proj    transformer.resblocks.i.attn.out_proj
    encoder.layers.i.layer_norm{1,2}       transformer.resblocks.i.ln_{1,2}
    encoder.layers.i.mlp.fc{1,2}           transformer.resblocks.i.mlp.c_{fc,proj}
    visual_projection.weight               visual.proj (transposed)
    text_model.embeddings.token_embedding  token_embedding;  its position_embedding -> positional_embedding
    text_model.final_layer_norm            ln_final
    text_projection.weight                 text_projection (transposed);  logit_scale -> logit_scale

Integer ``position_ids`` buffers (older checkpoints) are dropped: they are 0, 1, 2, ... by construction.
The mapping needs only state dicts; ``transformers`` itself is not imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from tallmasks.core.errors import CheckpointError

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {  # transformers suffix -> open_clip suffix, inside one transformer layer
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_QKV = ("q", "k", "v")
_VISION = {  # inside the vision tower (after its prefix)
    "embeddings.class_embedding": "visual.class_embedding",
    "embeddings.patch_embedding.weight": "visual.conv1.weight",
    "embeddings.position_embedding.weight": "visual.positional_embedding",
    "pre_layrnorm.weight": "visual.ln_pre.weight",
    "pre_layrnorm.bias": "visual.ln_pre.bias",
    "post_layernorm.weight": "visual.ln_post.weight",
    "post_layernorm.bias": "visual.ln_post.bias",
}
_TEXT = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_TOP = {"logit_scale": "logit_scale"}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_TOWERS = {"vision_model.": ("visual.transformer.", _VISION), "text_model.": ("transformer.", _TEXT)}


def _tower_of(key: str, bare_vision: bool) -> tuple[str, str] | None:
    """(transformers tower prefix, key inside the tower), or None for top-level keys."""
    for prefix in _TOWERS:
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    if bare_vision and key not in _TOP and key not in _TRANSPOSED:
        return "vision_model.", key
    return None


def hf_to_open_clip(state: Mapping[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """A transformers CLIP state dict in open_clip's layout under ``prefix``; unknown keys are refused."""
    bare_vision = not any(key.startswith(tuple(_TOWERS)) for key in state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids") and not value.dtype.is_floating_point:
            continue
        if key in _TOP:
            out[prefix + _TOP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[prefix + _TRANSPOSED[key]] = value.T.contiguous()
            continue
        tower = _tower_of(key, bare_vision)
        if tower is None:
            raise CheckpointError(f"{key!r} is not a transformers CLIP weight")
        tower_prefix, inner = tower
        layer_prefix, names = _TOWERS[tower_prefix]
        if inner in names:
            out[prefix + names[inner]] = value
            continue
        match = _LAYER.match(inner)
        if match is None:
            raise CheckpointError(f"{key!r} is not a transformers CLIP weight")
        index, part = match.groups()
        stem = f"{prefix}{layer_prefix}resblocks.{index}."
        if part in _LAYER_PARTS:
            out[stem + _LAYER_PARTS[part]] = value
            continue
        qkv_match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", part)
        if qkv_match is None:
            raise CheckpointError(f"{key!r} is not a transformers CLIP weight")
        which, kind = qkv_match.groups()
        qkv.setdefault(stem + f"attn.in_proj_{kind}", {})[which] = value
    for fused, parts in qkv.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise CheckpointError(f"{fused!r}: the {missing[0]}_proj of this attention layer is missing")
        out[fused] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


_UNTRANSPOSED = {ours: theirs for theirs, ours in _TRANSPOSED.items()}
_LAYER_INVERSE = {ours: theirs for theirs, ours in _LAYER_PARTS.items()}
_OURS_LAYER = re.compile(r"(visual\.transformer\.|transformer\.)resblocks\.(\d+)\.(.+)")


def open_clip_to_hf(
    state: Mapping[str, torch.Tensor], prefix: str = "model.", vision_prefix: str = "vision_model."
) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_open_clip: open_clip keys under ``prefix`` back to transformers names (vision
    keys under ``vision_prefix``: ``vision_model.`` as CLIPModel, or "" as transformers 5's CLIPVisionModel)."""
    towers = {"vision_model.": vision_prefix, "text_model.": "text_model."}
    renamed = {ours: towers[hf_prefix] + theirs for hf_prefix, (_, names) in _TOWERS.items() for theirs, ours in names.items()}
    renamed.update({ours: theirs for theirs, ours in _TOP.items()})
    layer_stems = {"visual.transformer.": vision_prefix, "transformer.": "text_model."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            raise CheckpointError(f"{key!r} does not start with {prefix!r}")
        ours = key[len(prefix) :]
        if ours in renamed:
            out[renamed[ours]] = value
            continue
        if ours in _UNTRANSPOSED:
            out[_UNTRANSPOSED[ours]] = value.T.contiguous()
            continue
        match = _OURS_LAYER.fullmatch(ours)
        if match is None:
            raise CheckpointError(f"{key!r} has no transformers CLIP counterpart")
        stem, index, part = match.groups()
        hf_stem = f"{layer_stems[stem]}encoder.layers.{index}."
        if part in _LAYER_INVERSE:
            out[hf_stem + _LAYER_INVERSE[part]] = value
        elif part in ("attn.in_proj_weight", "attn.in_proj_bias"):
            if value.shape[0] % 3:
                raise CheckpointError(f"{key!r}: {value.shape[0]} rows do not split into q, k and v")
            kind = part.rsplit("_", 1)[1]
            for which, chunk in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{hf_stem}self_attn.{which}_proj.{kind}"] = chunk.contiguous()
        else:
            raise CheckpointError(f"{key!r} has no transformers CLIP counterpart")
    return out


def open_clip_config(hf_config: Mapping) -> dict:
    """open_clip CLIP constructor arguments (embed_dim, vision_cfg, text_cfg, quick_gelu) equivalent to a
    transformers CLIPConfig (as a dict; a vision config alone gives no text_cfg)."""
    vision = hf_config.get("vision_config", hf_config)
    text = hf_config.get("text_config")
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu") or (text and text.get("hidden_act", act) != act):
        raise CheckpointError(f"CLIP activation {act!r} has no open_clip equivalent (quick_gelu or gelu in both towers)")
    for part in (vision, text or {}):
        if float(part.get("layer_norm_eps", 1e-5)) != 1e-5:
            raise CheckpointError("open_clip's layer norms use eps 1e-5; this CLIP uses another")
    width = int(vision["hidden_size"])
    cfg = {
        "embed_dim": int(hf_config.get("projection_dim", vision.get("projection_dim", width))),
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {
            "layers": int(vision["num_hidden_layers"]),
            "width": width,
            "head_width": width // int(vision["num_attention_heads"]),
            "mlp_ratio": int(vision["intermediate_size"]) / width,
            "patch_size": int(vision["patch_size"]),
            "image_size": int(vision["image_size"]),
        },
    }
    if text:
        cfg["text_cfg"] = {
            "context_length": int(text["max_position_embeddings"]),
            "vocab_size": int(text["vocab_size"]),
            "width": int(text["hidden_size"]),
            "heads": int(text["num_attention_heads"]),
            "layers": int(text["num_hidden_layers"]),
            "mlp_ratio": int(text["intermediate_size"]) / int(text["hidden_size"]),
        }
    return cfg
