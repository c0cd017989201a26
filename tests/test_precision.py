"""Precision settings: what each one switches, scoped to its block, and the attention path under fp32."""

from __future__ import annotations

import pytest
import torch

from tallmasks.core.errors import ConfigError
from tallmasks.core.precision import PRECISIONS, precision_context


def _switches() -> tuple[bool, bool, bool]:
    return (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.mha.get_fastpath_enabled(),
    )


def _vision_transformer() -> torch.nn.Module:
    """A tiny open_clip ViT with an even number of heads (odd head counts never take the fused path)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=32).eval()


def test_fp32_and_paper_take_the_standard_attention_path(monkeypatch, request):
    vit = _vision_transformer()
    assert vit.transformer.resblocks[0].attn.batch_first  # open_clip 3 builds batch-first attention
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():  # with gradients, nn.MultiheadAttention never takes its fused path
        standard = vit(images).detach()
    fused_calls = []
    fused_kernel = torch._native_multi_head_attention

    def counting_kernel(*args, **kwargs):
        fused_calls.append(1)
        return fused_kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counting_kernel)
    # the default, whatever an earlier in-process run (main.py's set_backend) left
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    request.addfinalizer(lambda: torch.backends.mha.set_fastpath_enabled(enabled))
    before = _switches()
    with torch.no_grad():
        for precision in ("fp32", "paper"):
            with precision_context(precision):
                assert torch.equal(vit(images), standard), precision
        assert not fused_calls
        # without the switch, inference takes the fused path (whose bits may differ from the standard path's)
        vit(images)
    assert _switches() == before
    assert fused_calls


@pytest.mark.parametrize(
    "precision, matmul_tf32, conv_tf32, fastpath",
    [("fp32", False, False, False), ("paper", False, True, False), ("tf32", True, True, True), ("bf16", False, False, True)],
)
def test_precision_switches_are_scoped(precision, matmul_tf32, conv_tf32, fastpath):
    torch.backends.cudnn.allow_tf32 = not conv_tf32  # something to restore
    before = _switches()
    try:
        with precision_context(precision, "cpu"):
            assert _switches() == (matmul_tf32, conv_tf32, fastpath)
            assert torch.is_autocast_enabled("cpu") == (precision == "bf16")
        assert _switches() == before
    finally:
        torch.backends.cudnn.allow_tf32 = True


def test_unknown_precision_is_one_line():
    assert PRECISIONS == ("fp32", "paper", "tf32", "bf16")
    with pytest.raises(ConfigError, match="precision must be one of fp32, paper, tf32, bf16, got 'fp16'"):
        with precision_context("fp16"):
            pass
