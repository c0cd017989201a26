"""The demo's VGG-style tower (tallmasks-demo-vgg): the model, its permutation spec and its correction sites."""

from __future__ import annotations

import pytest
import torch

from tallmasks.models import DEMO_CNN_MODEL, ImageEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(seed: int = 0) -> ImageEncoder:
    torch.manual_seed(seed)
    encoder = ImageEncoder(DEMO_CNN_MODEL, pretrained=None).eval()
    with torch.no_grad():  # norms away from their identity init, so a wrong permutation of them shows
        for module in encoder.modules():
            if hasattr(module, "num_features"):
                module.weight.normal_()
                module.bias.normal_()
    return encoder


def test_channel_layer_norm_is_a_layer_norm_over_each_pixels_channels():
    from tallmasks.models.vgg import ChannelLayerNorm

    norm = ChannelLayerNorm(5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 3, 4)
    mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, 5, 1, 1) + norm.bias.view(1, 5, 1, 1)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_the_tower_is_the_seeds_vgg_shape():
    """Convolutions without bias, each followed by its channel norm and a ReLU; two dense layers; a projection
    without bias to the CLIP embedding; the text tower is DEMO_MODEL's."""
    from torch import nn

    from tallmasks.models import create_clip, get_tokenizer
    from tallmasks.models.vgg import ChannelLayerNorm

    layers = list(_encoder().model.visual.layers)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and all(layers[i].bias is None for i in convs)
    assert all(isinstance(layers[i + 1], ChannelLayerNorm) and isinstance(layers[i + 2], nn.ReLU) for i in convs)
    dense = [m for m in layers if isinstance(m, nn.Linear)]
    assert len(dense) == 3 and dense[-1].bias is None and dense[-1].out_features == 64
    clip = create_clip(DEMO_CNN_MODEL, pretrained=None)
    assert clip.encode_text(get_tokenizer(DEMO_CNN_MODEL)(["a photo"])).shape == (1, 64)
    assert clip.encode_image(torch.randn(3, 3, 16, 16)).shape == (3, 64)


@pytest.mark.parametrize("embedding", [True, False])
def test_a_random_permutation_of_the_chain_spec_keeps_every_heads_logits(embedding):
    """The chain spec of model.visual (units of every conv and dense layer, with their norms; with
    ``embedding`` the projection's outputs too, which the heads' inputs follow) changes no logit."""
    from tallmasks.non_local.experiment import visual_spec, vit_heads
    from tallmasks.non_local.permutation import EMBEDDING_GROUP, apply_permutation, permute_head, random_permutation

    encoder = _encoder()
    assert vit_heads(encoder) is None
    state = encoder.state_dict()
    spec = visual_spec(state, None, embedding)
    assert (EMBEDDING_GROUP in spec.sizes) == embedding and len(spec.sizes) == 8 + embedding
    assert all(k.startswith("model.visual.") for k in spec.axes)  # the text tower is left alone
    perm = random_permutation(spec, torch.Generator().manual_seed(1))
    moved = ImageEncoder(DEMO_CNN_MODEL, pretrained=None).eval()
    moved.load_state_dict(apply_permutation(spec, perm, state))
    head = torch.randn(7, 64)
    images = torch.randn(5, 3, 16, 16)
    expected = encoder(images) @ head.T
    torch.testing.assert_close(moved(images) @ permute_head(head, perm).T, expected, atol=1e-4, rtol=1e-4)
    if embedding:  # the features themselves moved: a head left as it is would read them wrongly
        assert not torch.allclose(moved(images) @ head.T, expected, atol=1e-3)


def test_correction_sites_are_the_seeds():
    """After every convolution's norm (6), after both dense layers and at the output embedding (9 sites)."""
    from torch import nn

    from tallmasks.models.vgg import ChannelLayerNorm
    from tallmasks.non_local.sites import find_sites

    encoder = _encoder()
    sites, chain = find_sites(encoder)
    layers = encoder.model.visual.layers
    kinds = [type(layers[int(s.module.rsplit(".", 1)[1])]) for s in sites]
    assert chain == [] and kinds == [ChannelLayerNorm] * 6 + [nn.Linear] * 3
    assert all(s.channel_dim == 1 for s in sites[:6]) and all(s.channel_dim == -1 for s in sites[6:])
    assert sites[-1].module.endswith(f"layers.{len(layers) - 1}")  # the projection


def test_tact_on_the_tower_matches_its_expert_statistics_and_folds():
    """TACT on the VGG: after calibration each site's per-channel mean and std on the calibration images
    are the expert's; folding the correction into the weights gives the same features."""
    from tallmasks.non_local import Corrector, fold_correction

    expert, merged = _encoder(0), _encoder(1)
    images = torch.rand(64, 3, 16, 16)
    expert_corrector = Corrector(expert)
    target = expert_corrector.statistics(images, batch_size=32)
    expert_corrector.remove()
    corrector = Corrector(merged)
    corr = corrector.calibrate("task", images, target, batch_size=32)
    corrector.set("task", corr)
    after = corrector.statistics(images, task="task", batch_size=32)
    with corrector.use("task"):
        corrected = merged(images)
    for site in corrector.sites:
        torch.testing.assert_close(after[site.name].mean, target[site.name].mean, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(after[site.name].std, target[site.name].std, atol=2e-3, rtol=1e-3)
    folded, leftover = fold_correction(merged.state_dict(), corrector.sites, corr)
    corrector.remove()
    plain = ImageEncoder(DEMO_CNN_MODEL, pretrained=None).eval()
    plain.load_state_dict(folded)
    leftover_corrector = Corrector(plain)
    leftover_corrector.set("task", leftover)
    with leftover_corrector.use("task"):
        torch.testing.assert_close(plain(images), corrected, atol=1e-4, rtol=1e-4)
    leftover_corrector.remove()
    assert set(leftover) <= {corrector.sites[-1].name}  # only the projection (no bias for a shift) is left over


def test_linear_probe_depends_on_its_seed_only(tmp_path):
    """The probe's augmented features are drawn from its seed, whatever ran before in the process (experts
    are fine-tuned in reused worker processes), and it trains the head's weight only."""
    from tallmasks.datasets import DEMO_DATASETS, load_split
    from tallmasks.demo.local import FinetuneSettings, linear_probe
    from tallmasks.models import ClassificationHead

    train = torch.utils.data.Subset(load_split(DEMO_DATASETS[0], "train", tmp_path), range(40))
    settings = FinetuneSettings(batch_size=16, train_head=True, probe_steps=3)
    heads = []
    for noise in (0, 5):
        torch.rand(noise)  # a different global generator state before each probe
        encoder = _encoder()
        head = ClassificationHead(True, torch.randn(6, 64, generator=torch.Generator().manual_seed(0)))
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        linear_probe(encoder, head, train, settings, seed=3)
        assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items()) and not head.bias.any()
        heads.append(head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], torch.randn(6, 64, generator=torch.Generator().manual_seed(0)))
