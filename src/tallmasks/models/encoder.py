"""open_clip models: creation (with the bundled demo config) and the image encoder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tallmasks.core.errors import ConfigError, TallmasksError

log = logging.getLogger(__name__)

MODELS: list[str] = ["ViT-B-32", "ViT-B-16", "ViT-L-14"]
DEMO_MODEL = "tallmasks-demo"
#: the demo CLIP with a VGG-style image tower (tallmasks.models.vgg) and DEMO_MODEL's text tower
DEMO_CNN_MODEL = "tallmasks-demo-vgg"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_registered = False


def register_demo_model() -> None:
    """Make the bundled model configs (DEMO_MODEL) known to open_clip; idempotent."""
    global _registered
    if _registered:
        return
    import open_clip

    if (CONFIG_DIR / f"{DEMO_MODEL}.json").is_file():
        open_clip.add_model_config(CONFIG_DIR)
    _registered = True


def known_models() -> list[str]:
    """Model names that create_clip accepts."""
    import open_clip

    register_demo_model()
    return [*open_clip.list_models(), DEMO_CNN_MODEL]


def text_model(model_name: str) -> str:
    """The open_clip config that gives ``model_name`` its text tower and tokenizer (itself, but for DEMO_CNN_MODEL)."""
    return DEMO_MODEL if model_name == DEMO_CNN_MODEL else model_name


def get_tokenizer(model_name: str) -> Any:
    """open_clip's tokenizer of ``model_name``; a bundled config's relative ``bpe_path`` is found beside it."""
    import open_clip

    register_demo_model()
    model_name = text_model(model_name)
    config_file = CONFIG_DIR / f"{model_name}.json"
    kwargs = {}
    if config_file.is_file():
        text_cfg = json.loads(config_file.read_text()).get("text_cfg", {})
        bpe = text_cfg.get("tokenizer_kwargs", {}).get("bpe_path")
        if bpe:
            kwargs["bpe_path"] = str(CONFIG_DIR / bpe)
    return open_clip.get_tokenizer(model_name, **kwargs)


def _check_name(model_name: str) -> None:
    if model_name not in known_models():
        raise ConfigError(f"unknown model {model_name!r}; expected one of {', '.join(MODELS + [DEMO_MODEL, DEMO_CNN_MODEL])}")


def _check_pretrained(model_name: str, pretrained: str | None) -> None:
    if model_name in (DEMO_MODEL, DEMO_CNN_MODEL) and pretrained is not None and not Path(pretrained).is_file():
        raise ConfigError(
            f"{DEMO_MODEL} has no downloadable weights: pass pretrained=None (random init) "
            f"or the path of a weights file, not {pretrained!r}"
        )


def _fetch_error(model_name: str, pretrained: str, cache_dir: str | None, exc: BaseException) -> TallmasksError:
    from tallmasks.core.errors import one_line

    where = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface/hub"
    return TallmasksError(
        f"could not fetch the {pretrained!r} weights of {model_name} ({one_line(exc, 160)}); they build the pre-trained "
        f"encoder (MNISTVal/nonlinear_zeroshot.pt) and the zero-shot heads that are missing. Fetch them once with network "
        f"access (open_clip cache: {where}), or give a local open_clip weights file (main.py: pretrained_weights=PATH), "
        f"or place the released nonlinear_zeroshot.pt and head_<Dataset>Val files under model_location"
    )


def uses_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the model is OpenAI's CLIP, whose MLPs use QuickGELU: the paper's models with ``openai`` weights,
    or built empty (pretrained=None) or from a file to receive such weights (the released checkpoints).
    open_clip's ViT configs say GELU; its old ``openai`` loader (the paper's open_clip 2.10) forced QuickGELU."""
    if model_name not in MODELS:
        return False
    return pretrained is None or pretrained == "openai" or Path(pretrained).is_file()


def create_clip_and_transforms(
    model_name: str, pretrained: str | None = "openai", cache_dir: str | None = None, device: str = "cpu"
) -> tuple[Any, Any, Any]:
    """(open_clip CLIP model, train_preprocess, val_preprocess) for ``model_name``."""
    import open_clip

    _check_name(model_name)
    _check_pretrained(model_name, pretrained)
    if model_name == DEMO_CNN_MODEL:
        return _demo_cnn_clip(pretrained, device)
    try:
        return open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            cache_dir=cache_dir,
            device=device,
            force_quick_gelu=uses_quick_gelu(model_name, pretrained),
        )
    except (RuntimeError, OSError, ValueError) as exc:
        if pretrained is None:
            raise
        if Path(pretrained).is_file():
            raise TallmasksError(f"{pretrained}: not a loadable open_clip weights file for {model_name} ({exc})") from None
        raise _fetch_error(model_name, pretrained, cache_dir, exc) from None


def _demo_cnn_clip(pretrained: str | None, device: str) -> tuple[Any, Any, Any]:
    """DEMO_MODEL's CLIP and transforms with its image tower replaced by the demo VGG (same embedding, image
    size and normalization); ``pretrained``: None or a weights file of this model."""
    import open_clip

    from tallmasks.models.vgg import DemoVGG

    clip, train_preprocess, val_preprocess = open_clip.create_model_and_transforms(DEMO_MODEL, pretrained=None, device=device)
    vit = clip.visual
    size = vit.image_size[0] if isinstance(vit.image_size, (tuple, list)) else vit.image_size
    config = vit.preprocess_cfg
    clip.visual = DemoVGG(vit.output_dim, int(size), config["mean"], config["std"]).to(device)
    if pretrained is not None:
        from tallmasks.io.checkpoints import load_state_dict

        try:
            clip.load_state_dict(dict(load_state_dict(pretrained).items()))
        except RuntimeError as exc:
            raise TallmasksError(f"{pretrained}: not a weights file of {DEMO_CNN_MODEL} ({str(exc).splitlines()[0]})") from None
    return clip, train_preprocess, val_preprocess


def create_clip(model_name: str, pretrained: str | None = "openai", cache_dir: str | None = None) -> Any:
    """An open_clip CLIP model (image and text towers). DEMO_MODEL needs pretrained=None or a local file."""
    return create_clip_and_transforms(model_name, pretrained, cache_dir)[0]


class ImageEncoder(torch.nn.Module):
    """The image tower of a CLIP model; state-dict keys start with ``model.`` like the released checkpoints."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = "openai",
        keep_lang: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.model_name = model_name
        self.model, self.train_preprocess, self.val_preprocess = create_clip_and_transforms(model_name, pretrained, cache_dir)
        if not keep_lang and hasattr(self.model, "transformer"):
            # Same deletion as the paper's code, so keys match its checkpoints.
            delattr(self.model, "transformer")
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean: tuple[float, ...] = tuple(float(x) for x in getattr(visual, "image_mean", None) or _OPENAI_MEAN)
        self.std: tuple[float, ...] = tuple(float(x) for x in getattr(visual, "image_std", None) or _OPENAI_STD)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image_encoder(model_name: str, path: str | Path) -> ImageEncoder:
    """An ImageEncoder holding the weights of a saved state dict (released layout, keys ``model.*``);
    nothing is downloaded."""
    from tallmasks.core.errors import CheckpointError
    from tallmasks.io.checkpoints import load_state_dict

    encoder = ImageEncoder(model_name, pretrained=None)
    state = load_state_dict(path)
    expected = set(encoder.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        culprit = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(
            f"{path}: does not match the {model_name} image encoder ({len(missing)} missing, {len(extra)} unexpected keys; {culprit})"
        )
    try:
        encoder.load_state_dict({key: state[key] for key in expected})
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: {str(exc).splitlines()[-1].strip()}") from None
    return encoder


def save_zeroshot_encoder(model_name: str, model_location: str | Path, pretrained: str | None = "openai") -> Path:
    """Save the pre-trained image encoder at <loc>/<model>/MNISTVal/nonlinear_zeroshot.pt (atomic; kept if present)."""
    from tallmasks.io.checkpoints import save_state_dict
    from tallmasks.models.paths import zeroshot_path

    path = zeroshot_path(model_location, model_name)
    if not path.is_file():
        encoder = ImageEncoder(model_name, pretrained=pretrained)
        save_state_dict({key: value.detach().cpu() for key, value in encoder.state_dict().items()}, path)
    return path
