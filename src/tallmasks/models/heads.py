"""Zero-shot classification heads and the image classifier."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tallmasks.core.errors import CheckpointError
from tallmasks.core.precision import precision_context
from tallmasks.core.progress import progress
from tallmasks.models.paths import head_path, val_name

log = logging.getLogger(__name__)


class ClassificationHead(torch.nn.Linear):
    """Linear layer over (optionally L2-normalized) image features; weights = class text embeddings."""

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = bool(normalize)
        with torch.no_grad():
            self.weight.copy_(weights)
            if biases is not None:
                self.bias.copy_(biases)
            else:
                self.bias.zero_()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)

    def save(self, path: str | Path) -> None:
        """Atomically save as safetensors (weight, bias; metadata normalize)."""
        from tallmasks.io.checkpoints import save_state_dict

        save_state_dict(
            {"weight": self.weight.detach().float().cpu(), "bias": self.bias.detach().float().cpu()},
            path,
            metadata={"normalize": str(self.normalize).lower()},
        )

    @classmethod
    def load(cls, path: str | Path) -> ClassificationHead:
        """Load a head saved by :meth:`save`."""
        from safetensors import safe_open

        from tallmasks.io.guard import require_file

        path = require_file(path, "head")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
                weight = handle.get_tensor("weight")
                bias = handle.get_tensor("bias") if "bias" in handle.keys() else None
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable head file ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
        if weight.ndim != 2:
            raise CheckpointError(f"{path}: head weight must be 2-D, found shape {tuple(weight.shape)}")
        normalize = meta.get("normalize", "true").lower() == "true"
        return cls(normalize, weight, bias)


def load_released_head(path: str | Path) -> ClassificationHead:
    """A released ``head_<Dataset>Val.pt`` (the paper's pickled module, read without running its code)."""
    from tallmasks.io.released import read_released_head

    weight, bias, normalize = read_released_head(path)
    return ClassificationHead(normalize, weight, bias)


def convert_released_head(src: str | Path, dst: str | Path | None = None) -> Path:
    """Convert a released head .pt to our safetensors format (default: same name, .safetensors)."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    load_released_head(src).save(dst)
    return dst


class ImageClassifier(torch.nn.Module):
    """Image encoder followed by a classification head."""

    def __init__(self, image_encoder: torch.nn.Module, classification_head: ClassificationHead):
        super().__init__()
        self.image_encoder = image_encoder
        self.classification_head = classification_head
        self.train_preprocess = getattr(image_encoder, "train_preprocess", None)
        self.val_preprocess = getattr(image_encoder, "val_preprocess", None)

    def freeze_head(self) -> None:
        for param in self.classification_head.parameters():
            param.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.image_encoder(images))


def _tokenizer_for(clip_model: Any, model_name: str | None) -> Callable[[list[str]], torch.Tensor]:
    import open_clip

    if model_name:
        from tallmasks.models.encoder import get_tokenizer

        return get_tokenizer(model_name)
    context = int(getattr(clip_model, "context_length", 77) or 77)
    return lambda texts: open_clip.tokenize(texts, context_length=context)


@torch.no_grad()
def build_zeroshot_head(
    clip_model: Any,
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]],
    device: str | torch.device = "cpu",
    model_name: str | None = None,
) -> ClassificationHead:
    """Per class: encode every template, L2-normalize each, average, L2-normalize, scale by logit_scale.exp()."""
    tokenize = _tokenizer_for(clip_model, model_name)
    was_training = clip_model.training
    clip_model.eval()
    clip_model.to(device)
    rows = []
    for classname in progress(classnames, desc="zero-shot head", leave=False, disable=len(classnames) < 50):
        tokens = tokenize([template(classname) for template in templates]).to(device)
        with precision_context("fp32", device):  # float32 and the standard attention path, as the paper's
            embeddings = clip_model.encode_text(tokens).float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    weights = torch.stack(rows, dim=0) * clip_model.logit_scale.exp().float()
    clip_model.train(was_training)
    return ClassificationHead(normalize=True, weights=weights.cpu())


def get_classification_head(
    model_name: str,
    dataset: str,
    model_location: str | Path,
    device: str | torch.device = "cpu",
    clip_model: Any = None,
    pretrained: str | None = "openai",
) -> ClassificationHead:
    """The zero-shot head of ``dataset``: our cached safetensors file, else the released .pt converted
    safely, else built from the text tower (``clip_model`` or create_clip(model_name, pretrained)) and cached."""
    ours = head_path(model_location, model_name, dataset)
    if ours.is_file():
        return ClassificationHead.load(ours)
    released = head_path(model_location, model_name, dataset, released=True)
    if released.is_file():
        head = load_released_head(released)
        head.save(ours)
        log.info("converted released head %s -> %s", released, ours)
        return head
    from tallmasks.datasets import get_spec

    spec = get_spec(dataset)
    if clip_model is None:
        from tallmasks.models.encoder import create_clip

        clip_model = create_clip(model_name, pretrained)
    log.info("building the zero-shot head of %s for %s", val_name(dataset), model_name)
    head = build_zeroshot_head(clip_model, spec.classnames, spec.templates, device=device, model_name=model_name)
    head.save(ours)
    return head
