"""The demo's VGG-style image tower (``tallmasks-demo-vgg``): the CNN of the non-local merging paper's
headline setting, scaled to the demo's 16 x 16 images and two cores.

As the paper's VGG (Sharma, Roy, Dziugaite 2024): 3 x 3 convolutions without bias, each followed by a
layer norm over the channels of every pixel and a ReLU, max pooling between stages, global average
pooling, two dense layers with ReLU, and a linear projection without bias to the CLIP embedding (the
heads L2-normalize it). Every layer is one entry of ``layers`` in forward order, so the state dict is a
chain of layers in key order (:func:`tallmasks.non_local.permutation.mlp_spec`) and each convolution's
norm is registered right after it (:func:`tallmasks.non_local.sites.generic_sites`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: output channels of the convolutions, per stage (a max pool after every stage but the last)
STAGES: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64), (128, 128))
DENSE_WIDTH = 256


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels (axis 1) of each position of a conv map, with a per-channel affine."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), (self.num_features,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class DemoVGG(nn.Module):
    """VGG-style image tower: ``images`` (N, 3, H, W), normalized -> (N, ``embed_dim``) features."""

    def __init__(
        self,
        embed_dim: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        stages: Sequence[Sequence[int]] = STAGES,
        dense_width: int = DENSE_WIDTH,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for index, stage in enumerate(stages):
            for width in stage:
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), ChannelLayerNorm(width), nn.ReLU()]
                channels = width
            if index < len(stages) - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers += [nn.Linear(channels, dense_width), nn.ReLU(), nn.Linear(dense_width, dense_width), nn.ReLU()]
        layers.append(nn.Linear(dense_width, embed_dim, bias=False))
        self.layers = nn.Sequential(*layers)
        self.output_dim = int(embed_dim)
        self.image_size = (int(image_size), int(image_size))
        self.image_mean = tuple(float(x) for x in mean)
        self.image_std = tuple(float(x) for x in std)
        self.preprocess_cfg = {"size": self.image_size, "mean": self.image_mean, "std": self.image_std}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)

    @staticmethod
    def describe() -> str:
        """The architecture in words (part of a foundation's fingerprint)."""
        return f"DemoVGG stages={[list(s) for s in STAGES]} dense={DENSE_WIDTH} conv_bias=False norm=ChannelLayerNorm"
