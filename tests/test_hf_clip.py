"""transformers CLIP checkpoints: the key and layout mapping, and pools of them in main.py and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")

from conftest import run_cli  # noqa: E402

from tallmasks.core.errors import CheckpointError, ConfigError  # noqa: E402
from tallmasks.models.hf_clip import hf_to_open_clip, open_clip_config, open_clip_to_hf  # noqa: E402

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4, hidden_act="quick_gelu"
)
TEXT = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=100,
    max_position_embeddings=8,
    hidden_act="quick_gelu",
    bos_token_id=98,
    eos_token_id=99,
    pad_token_id=1,
)


def perturbed(model, seed=0):
    """Random non-default weights everywhere (layer norms included), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf_clip():
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=20)
    return config, perturbed(transformers.CLIPModel(config))


def features(output):
    return output if torch.is_tensor(output) else output.pooler_output


def test_mapped_clip_model_gives_the_same_image_and_text_features(hf_clip):
    import open_clip

    config, hf = hf_clip
    mapped = hf_to_open_clip(hf.state_dict(), prefix="")
    ours = open_clip.model.CLIP(**open_clip_config(config.to_dict())).eval()
    ours.load_state_dict(mapped)  # strict: every key, no extra
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[98, 5, 7, 99, 1, 1, 1, 1], [98, 9, 12, 40, 3, 99, 1, 1]])
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), features(hf.get_image_features(pixel_values=images)), atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), features(hf.get_text_features(input_ids=tokens)), atol=1e-5)
    assert mapped["visual.proj"].shape == (32, 20) and mapped["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)


def test_vision_model_with_projection_maps_onto_the_visual_tower(hf_clip):
    import open_clip

    config, _ = hf_clip
    hf = perturbed(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION, projection_dim=20)), 2)
    mapped = hf_to_open_clip(hf.state_dict(), prefix="")
    assert set(mapped) == {k for k in open_clip.model.CLIP(**open_clip_config(config.to_dict())).state_dict() if k.startswith("visual.")}
    visual = open_clip.model.CLIP(**open_clip_config(config.to_dict())).visual.eval()
    visual.load_state_dict({k[len("visual.") :]: v for k, v in mapped.items()})
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(visual(images), hf(pixel_values=images).image_embeds, atol=1e-5)


def test_mapping_back_and_forth_is_lossless(hf_clip):
    _, hf = hf_clip
    full = hf.state_dict()
    ours = hf_to_open_clip(full)
    back = open_clip_to_hf(ours)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
    again = hf_to_open_clip(back)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    # transformers 5 saves a CLIPVisionModel with bare keys; older versions under vision_model.
    bare = perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), 4).state_dict()
    assert not any(k.startswith("vision_model.") for k in bare)
    back = open_clip_to_hf(hf_to_open_clip(bare), vision_prefix="")
    assert set(back) == set(bare) and all(torch.equal(back[k], bare[k]) for k in bare)
    legacy = {"vision_model." + k: v for k, v in bare.items()}
    legacy["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)  # older checkpoints keep it
    assert set(hf_to_open_clip(legacy)) == set(hf_to_open_clip(bare))


def test_mapping_refuses_what_it_does_not_know(hf_clip):
    _, hf = hf_clip
    state = dict(hf.state_dict())
    with pytest.raises(CheckpointError, match="'vision_model.extra.weight' is not a transformers CLIP weight"):
        hf_to_open_clip({**state, "vision_model.extra.weight": torch.zeros(1)})
    del state["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="k_proj of this attention layer is missing"):
        hf_to_open_clip(state)
    with pytest.raises(CheckpointError, match="no transformers CLIP counterpart"):
        open_clip_to_hf({"model.visual.unknown": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------
# pools: a demo-architecture CLIPModel as base, CLIPVisionModel task checkpoints, all local and offline


@pytest.fixture(scope="module")
def local_pool(tmp_path_factory):
    from tallmasks.datasets import DEMO_DATASETS
    from tallmasks.models import DEMO_MODEL, ImageEncoder

    root = tmp_path_factory.mktemp("pool")
    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    clip_cfg = encoder.model.visual
    width, layers = clip_cfg.conv1.out_channels, len(clip_cfg.transformer.resblocks)
    heads, patch = clip_cfg.transformer.resblocks[0].attn.num_heads, clip_cfg.conv1.kernel_size[0]
    vision = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=encoder.image_size,
        patch_size=patch,
        hidden_act="gelu",
    )
    vocab = encoder.model.token_embedding.num_embeddings  # the demo's own small vocabulary
    text = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=vocab,
        max_position_embeddings=24,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    base = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    base.save_pretrained(root / "base")
    tasks = list(DEMO_DATASETS[:2])
    sources = {}
    for i, task in enumerate(tasks):
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
        model.load_state_dict({k[len("vision_model.") :]: v for k, v in base.state_dict().items() if k.startswith("vision_model.")})
        perturbed(model, seed=10 + i).save_pretrained(root / task)
        sources[task] = str(root / task)
    pool_file = root / "demo_pool.yaml"
    pool_file.write_text(json.dumps({"model": DEMO_MODEL, "pool": {"name": "demo-pool", "base": str(root / "base"), "tasks": sources}}))
    return {"root": root, "base": base.eval(), "tasks": tasks, "file": pool_file}


def test_prepare_pool_writes_the_released_layout_once(local_pool, tmp_path):
    from tallmasks.experiments.pools import load_pool, prepare_pool
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.models import DEMO_MODEL, ImageEncoder, finetuned_path, head_path, zeroshot_path

    pool = load_pool(local_pool["file"])
    assert pool.name == "demo-pool" and list(pool.tasks) == local_pool["tasks"]
    root = prepare_pool(pool, tmp_path / "checkpoints")
    assert root == tmp_path / "checkpoints" / "hf" / "demo-pool"
    encoder = ImageEncoder(DEMO_MODEL, pretrained=None).eval()
    theta0 = load_state_dict(zeroshot_path(root, DEMO_MODEL))
    assert set(theta0) == set(encoder.state_dict())
    encoder.load_state_dict({k: theta0[k] for k in theta0})
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = features(local_pool["base"].get_image_features(pixel_values=images))
        assert torch.allclose(encoder(images), expected, atol=1e-5)
    task = load_state_dict(finetuned_path(root, DEMO_MODEL, local_pool["tasks"][0]))
    assert torch.equal(task["model.visual.proj"], theta0["model.visual.proj"])  # borrowed from the base
    assert torch.equal(task["model.token_embedding.weight"], theta0["model.token_embedding.weight"])
    assert not torch.equal(task["model.visual.conv1.weight"], theta0["model.visual.conv1.weight"])
    assert all(head_path(root, DEMO_MODEL, t).is_file() for t in local_pool["tasks"])
    stamp = zeroshot_path(root, DEMO_MODEL).stat().st_mtime_ns
    assert prepare_pool(pool, tmp_path / "checkpoints") == root
    assert zeroshot_path(root, DEMO_MODEL).stat().st_mtime_ns == stamp  # converted once


def test_pool_descriptions_are_checked(local_pool):
    from tallmasks.experiments.pools import FUSIONBENCH_TA8, Pool, load_pool

    fb = load_pool("clip-vit-base-patch32_TA8")
    assert list(fb.tasks) == FUSIONBENCH_TA8 and fb.model == "ViT-B-32" and fb.base == "openai/clip-vit-base-patch32"
    assert Pool.from_mapping({"base": "a/b", "tasks": {"stanford-cars": "c/d", "dtd": "e/f"}}, "ViT-B-32").select() == ["Cars", "DTD"]
    assert fb.select(None, 3) == FUSIONBENCH_TA8[:3] and fb.select(["mnist", "Cars"]) == ["MNIST", "Cars"]
    for bad, message in [
        (None, "needs a pool"),
        ({"base": "a/b"}, "task checkpoints"),
        ({"base": "a/b", "tasks": {"emnist_letters": "x/y"}}, "no counterpart"),
        ({"base": "a/b", "tasks": {"Cars": "x/y", "stanford-cars": "z/w"}}, "repeats"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Pool.from_mapping(bad, "ViT-B-32")
    with pytest.raises(ConfigError, match="not in pool"):
        fb.select(["PCAM"])


def test_main_and_cli_take_a_pool_directly(local_pool, tmp_path):
    from test_main import compose

    from tallmasks.experiments.pools import load_pool, pool_root
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.merging import CheckpointSet, merge
    from tallmasks.models import DEMO_MODEL, finetuned_path, zeroshot_path

    pool = json.loads(local_pool["file"].read_text())["pool"]
    overrides = [
        f"model={DEMO_MODEL}",
        "model_source=hf",
        f"+pool.name={pool['name']}",
        f"+pool.base={pool['base']}",
        *[f"+pool.tasks.{t}={s}" for t, s in pool["tasks"].items()],
        f"model_location={tmp_path / 'checkpoints'}",
        f"data_location={tmp_path / 'data'}",
        f"results_dir={tmp_path / 'results'}",
        "n_eval_points=4",
        "num_workers=0",
        "batch_size=64",
        "device=cpu",
        "method=ties",
    ]
    torch.set_num_threads(1)
    res = run_experiment(compose(overrides))
    assert "demo-pool" in res["results_path"] and set(res["per_task"]) == set(local_pool["tasks"])
    table = json.loads(
        (pool_root(tmp_path / "checkpoints", load_pool(local_pool["file"])) / DEMO_MODEL / "nonlinear_ft_accuracies.json").read_text()
    )
    assert set(table) == {t + s for t in local_pool["tasks"] for s in ("", "Val")}  # measured for the pool's models
    assert res["finetuned_accuracies"][local_pool["tasks"][0]] == table[local_pool["tasks"][0]]

    out = tmp_path / "merged.safetensors"
    proc = run_cli(
        "merge", "--pool", local_pool["file"], "--pool-dir", tmp_path / "checkpoints", "--method", "ties", "--out", out, "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr
    root = pool_root(tmp_path / "checkpoints", load_pool(local_pool["file"]))
    cs = CheckpointSet(zeroshot_path(root, DEMO_MODEL), [finetuned_path(root, DEMO_MODEL, t) for t in local_pool["tasks"]])
    expected = merge(cs, "ties")
    got = load_state_dict(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_unreachable_hub_is_one_line(tmp_path):
    from test_main import run_main

    from tallmasks.models import DEMO_MODEL

    args = [
        f"model={DEMO_MODEL}",
        "model_source=hf",
        "+pool.base=tallmasks-tests/absent-base",
        "+pool.tasks.Shapes=tallmasks-tests/absent-task",
        f"model_location={tmp_path / 'checkpoints'}",
        f"results_dir={tmp_path / 'results'}",
        "device=cpu",
    ]
    proc = run_main(args, tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "tallmasks-tests/absent-base" in line and "cannot reach the Hugging Face hub" in line
    assert not (tmp_path / "results").exists() and not any((tmp_path / "checkpoints").rglob("*.pt"))
