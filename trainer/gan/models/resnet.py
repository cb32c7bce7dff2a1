"""SNGAN-style ResNet pair (Miyato et al. 2018) for 32 and 64 px.

G: linear -> 4x4 -> residual up-blocks (BatchNorm, ReLU, nearest 2x, 3x3 convs) -> tanh.
D: residual down-blocks (ReLU, 3x3 convs, 2x average pool; the first one "optimized" with no
pre-activation) -> ReLU -> global sum pool -> linear. No normalization layers in D, so
gradient penalties see a per-sample function; spectral norm comes from `model.spectral_norm`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from trainer.gan.models.blocks import MinibatchStd


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2)
        h = self.c2(F.relu(self.bn2(self.c1(h))))
        return h + self.skip(F.interpolate(x, scale_factor=2))


class _DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, first: bool = False, down: bool = True):
        super().__init__()
        self.first, self.down = first, down
        # D is written with PyTorch layers; trainer.gan.ops gives them a cheaper double backward.
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else None
        self.act, self.pool = nn.ReLU(), nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else self.act(x)
        h = self.c2(self.act(self.c1(h)))
        if self.down:
            h = self.pool(h)
        s = x
        if self.skip is not None:
            # The optimized first block pools before its 1x1 skip conv; the others after.
            s = self.skip(self.pool(s)) if self.first else self.skip(s)
            if self.down and not self.first:
                s = self.pool(s)
        return h + s


class ResNetGenerator(nn.Module):
    """z (N, latent_dim) -> images (N, channels, resolution, resolution) in [-1, 1]."""

    def __init__(self, latent_dim: int, resolution: int = 32, channels: int = 3, width: int = 128):
        super().__init__()
        if resolution not in (32, 64):
            raise ValueError(f"ResNet resolution must be 32 or 64, got {resolution}")
        self.latent_dim = latent_dim
        self.out_shape = (channels, resolution, resolution)
        self.width = width
        self.project = nn.Linear(latent_dim, width * 16)
        self.blocks = nn.Sequential(*[_UpBlock(width, width) for _ in range(int(math.log2(resolution)) - 2)])
        self.out = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, channels, 3, padding=1), nn.Tanh()
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.project(z).view(z.shape[0], self.width, 4, 4)))


class ResNetDiscriminator(nn.Module):
    """images (N, channels, resolution, resolution) -> logits (N,)."""

    def __init__(self, resolution: int = 32, channels: int = 3, width: int = 128, mbstd_group: int = 0):
        super().__init__()
        if resolution not in (32, 64):
            raise ValueError(f"ResNet resolution must be 32 or 64, got {resolution}")
        self.in_shape = (channels, resolution, resolution)
        n_down = int(math.log2(resolution)) - 3  # to 8x8, then two blocks at 8x8 (SNGAN-32)
        blocks = [_DownBlock(channels, width, first=True)]
        blocks += [_DownBlock(width, width) for _ in range(n_down - 1)]
        self.blocks = nn.Sequential(*blocks)
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group else None
        extra = 1 if mbstd_group else 0
        self.tail = nn.Sequential(
            _DownBlock(width + extra, width, down=False), _DownBlock(width, width, down=False)
        )
        self.act = nn.ReLU()
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == self.in_shape, f"D expects {self.in_shape} images, got {tuple(x.shape[1:])}"
        h = self.blocks(x)
        if self.mbstd is not None:
            h = self.mbstd(h)
        h = self.act(self.tail(h))
        return self.head(h.sum(dim=(2, 3))).squeeze(1)
