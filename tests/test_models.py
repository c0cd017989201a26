"""Models: demo CLIP config, image encoder keys, zero-shot heads, paths, weight-fetch errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env

from tallmasks.core.errors import ConfigError, TallmasksError
from tallmasks.models import (
    DEMO_MODEL,
    ClassificationHead,
    ImageClassifier,
    ImageEncoder,
    build_zeroshot_head,
    create_clip,
    finetuned_path,
    get_classification_head,
    zeroshot_path,
)


@pytest.fixture(scope="module")
def demo_clip():
    torch.manual_seed(0)
    return create_clip(DEMO_MODEL, pretrained=None)


def test_paths(tmp_path):
    assert zeroshot_path(tmp_path, "ViT-B-32") == tmp_path / "ViT-B-32" / "MNISTVal" / "nonlinear_zeroshot.pt"
    assert finetuned_path(tmp_path, "ViT-B-32", "Cars") == tmp_path / "ViT-B-32" / "CarsVal" / "nonlinear_finetuned.pt"
    assert finetuned_path(tmp_path, "ViT-B-32", "CarsVal") == finetuned_path(tmp_path, "ViT-B-32", "Cars")


def test_demo_encoder_drops_text_tower_and_matches_keys(demo_clip):
    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    keys = list(encoder.state_dict())
    assert keys and all(key.startswith("model.") for key in keys)
    assert not any(key.startswith("model.transformer.") for key in keys)
    assert any(key.startswith("model.visual.") for key in keys)
    # the paper's checkpoints keep the non-transformer text parameters (token embedding, ln_final, ...)
    clip_keys = {"model." + k for k in demo_clip.state_dict() if not k.startswith("transformer.")}
    assert set(keys) == clip_keys
    assert encoder.image_size <= 32 and len(encoder.mean) == 3 and len(encoder.std) == 3
    images = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    assert encoder(images).shape == (2, demo_clip.text_projection.shape[1])
    # a saved state dict loads back into a fresh encoder
    other = ImageEncoder(DEMO_MODEL, pretrained=None)
    other.load_state_dict(encoder.state_dict())
    assert torch.allclose(other(images), encoder(images))
    kept = ImageEncoder(DEMO_MODEL, pretrained=None, keep_lang=True)
    assert any(key.startswith("model.transformer.") for key in kept.state_dict())


def test_val_preprocess_gives_normalized_tensor():
    from PIL import Image

    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    x = encoder.val_preprocess(image)
    assert x.shape == (3, encoder.image_size, encoder.image_size)
    assert torch.allclose(x[0], torch.full_like(x[0], (1 - encoder.mean[0]) / encoder.std[0]), atol=1e-4)


def test_zeroshot_head_formula(demo_clip):
    from tallmasks.models import get_tokenizer

    classnames = ["cat", "dog", "bird"]
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of a {c}."]
    head = build_zeroshot_head(demo_clip, classnames, templates, model_name=DEMO_MODEL)
    assert head.weight.shape == (3, demo_clip.text_projection.shape[1]) and head.normalize
    tokenizer = get_tokenizer(DEMO_MODEL)
    with torch.no_grad():
        rows = []
        for c in classnames:
            e = demo_clip.encode_text(tokenizer([t(c) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            rows.append(m / m.norm())
        expected = torch.stack(rows) * demo_clip.logit_scale.exp()
    assert torch.allclose(head.weight, expected, atol=1e-5)
    assert torch.count_nonzero(head.bias) == 0


def test_get_classification_head_builds_and_caches(tmp_path, demo_clip):
    from tallmasks.datasets import DEMO_DATASETS, get_spec

    if not DEMO_DATASETS:
        pytest.skip("no demo datasets registered")
    name = DEMO_DATASETS[0]
    head = get_classification_head(DEMO_MODEL, name, tmp_path, clip_model=demo_clip)
    cached = tmp_path / DEMO_MODEL / f"head_{name}Val.safetensors"
    assert cached.is_file()
    assert head.weight.shape[0] == len(get_spec(name).classnames)
    again = get_classification_head(DEMO_MODEL, name, tmp_path)  # no clip model needed once cached
    assert torch.equal(again.weight, head.weight)


def test_classifier_trains_encoder_only():
    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    head = ClassificationHead(True, torch.randn(4, 64))
    model = ImageClassifier(encoder, head)
    model.freeze_head()
    logits = model(torch.randn(2, 3, encoder.image_size, encoder.image_size))
    assert logits.shape == (2, 4)
    logits.sum().backward()
    assert head.weight.grad is None
    assert model.val_preprocess is encoder.val_preprocess


def test_bad_names():
    with pytest.raises(ConfigError, match="ViT-X"):
        create_clip("ViT-X-99")
    with pytest.raises(ConfigError, match=DEMO_MODEL):
        create_clip(DEMO_MODEL, pretrained="openai")


def test_unreachable_weights_give_one_line_error(tmp_path):
    """With the hub offline, open_clip fails fast; the failure becomes one TallmasksError line."""
    code = (
        "from tallmasks.models import create_clip\n"
        "from tallmasks.core.errors import TallmasksError\n"
        "try:\n"
        "    create_clip('ViT-B-32', pretrained='openai', cache_dir='CACHE')\n"
        "except TallmasksError as e:\n"
        "    print('ERR', e)\n"
    ).replace("CACHE", str(tmp_path / "no-open-clip-weights"))
    env = subprocess_env()
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert "could not fetch" in lines[0] and "ViT-B-32" in lines[0] and "no-open-clip-weights" in lines[0]
    assert issubclass(TallmasksError, Exception)


def test_load_image_encoder_from_released_layout(tmp_path):
    from tallmasks.core.errors import CheckpointError
    from tallmasks.models import load_image_encoder

    torch.manual_seed(3)
    source = ImageEncoder(DEMO_MODEL, pretrained=None)
    path = finetuned_path(tmp_path, DEMO_MODEL, "MNIST")
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    loaded = load_image_encoder(DEMO_MODEL, path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    state = source.state_dict()
    state.pop("model.visual.proj")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="model.visual.proj"):
        load_image_encoder(DEMO_MODEL, tmp_path / "bad.pt")


def test_save_zeroshot_encoder(tmp_path):
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.models import save_zeroshot_encoder

    path = save_zeroshot_encoder(DEMO_MODEL, tmp_path, pretrained=None)
    assert path == zeroshot_path(tmp_path, DEMO_MODEL)
    state = load_state_dict(path)
    assert all(key.startswith("model.") for key in state) and "model.visual.proj" in state
    stamp = path.stat().st_mtime_ns
    assert save_zeroshot_encoder(DEMO_MODEL, tmp_path, pretrained=None) == path and path.stat().st_mtime_ns == stamp


def test_openai_models_use_quick_gelu_like_the_released_checkpoints():
    """The paper's open_clip loaded OpenAI weights with QuickGELU; a GELU shell would change every logit."""
    from tallmasks.models import DEMO_MODEL, create_clip
    from tallmasks.models.encoder import uses_quick_gelu

    clip = create_clip("ViT-B-32", pretrained=None)
    activations = {type(m).__name__ for m in clip.modules() if "GELU" in type(m).__name__}
    assert activations == {"QuickGELU"}  # image and text towers
    assert uses_quick_gelu("ViT-L-14", "openai") and uses_quick_gelu("ViT-B-16", None)
    assert not uses_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") and not uses_quick_gelu(DEMO_MODEL, None)
