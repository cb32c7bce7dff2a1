"""SNGAN-style ResNet pair (Miyato et al. 2018) for 32, 64, 128 and 256 px.

G: linear -> 4x4 -> residual up-blocks (BatchNorm, ReLU, nearest 2x, 3x3 convs) -> tanh.
D: residual down-blocks (ReLU, 3x3 convs, 2x average pool; the first one "optimized" with no
pre-activation) -> ReLU -> global sum pool -> linear. No normalization layers in D, so
gradient penalties see a per-sample function; spectral norm comes from `model.spectral_norm`.

Up to 64 px every feature map has `width` channels (SNGAN's 32 px layout). Above 64 px the
channels halve with each doubling of the map (`channels_at`), as BigGAN's and StyleGAN's
pyramids do, so 128 and 256 px cost a few more blocks, not 4x and 16x the compute per block.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from trainer.gan.models.blocks import MinibatchStd, Projection, batch_norm, labels_from_latent, norm

RESOLUTIONS = (32, 64, 128, 256)


def channels_at(width: int, size: int) -> int:
    """Channels of a size x size feature map: `width` up to 64 px, halved per doubling above
    (never below 8)."""
    return width if size <= 64 else max(8, width * 64 // size)


def _check(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"ResNet resolution must be one of {RESOLUTIONS}, got {resolution}")


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes: int = 0):
        super().__init__()
        self.bn1, self.bn2 = batch_norm(cin, num_classes), batch_norm(cout, num_classes)
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.interpolate(F.relu(norm(self.bn1, x, y)), scale_factor=2)
        h = self.c2(F.relu(norm(self.bn2, self.c1(h), y)))
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
    """z (N, latent_dim) [, labels (N,)] -> images (N, channels, resolution, resolution) in
    [-1, 1]; class-conditional batch norms with `num_classes` > 0 (labels from z when omitted)."""

    def __init__(self, latent_dim: int, resolution: int, channels: int, width: int, num_classes: int):
        super().__init__()
        _check(resolution)
        self.latent_dim = latent_dim
        self.out_shape = (channels, resolution, resolution)
        self.width, self.num_classes = width, num_classes
        self.project = nn.Linear(latent_dim, width * 16)
        sizes = [4 * 2**i for i in range(int(math.log2(resolution)) - 1)]  # 4, 8, ..., resolution
        self.blocks = nn.Sequential(
            *[
                _UpBlock(channels_at(width, a), channels_at(width, b), num_classes)
                for a, b in zip(sizes, sizes[1:])
            ]
        )
        last = channels_at(width, resolution)
        self.out = nn.Sequential(
            nn.BatchNorm2d(last), nn.ReLU(), nn.Conv2d(last, channels, 3, padding=1), nn.Tanh()
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and y is None:
            y = labels_from_latent(z, self.num_classes)
        h = self.project(z).view(z.shape[0], self.width, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return self.out(h)


class ResNetDiscriminator(nn.Module):
    """images (N, channels, resolution, resolution) [, labels (N,)] -> logits (N,); a projection
    discriminator with `num_classes` > 0."""

    def __init__(self, resolution: int, channels: int, width: int, mbstd_group: int, num_classes: int):
        super().__init__()
        _check(resolution)
        self.in_shape = (channels, resolution, resolution)
        # Down to 8x8, then two blocks at 8x8 (SNGAN-32); each block's output map is half its input's.
        sizes = [resolution // 2**i for i in range(int(math.log2(resolution)) - 2)]  # resolution, ..., 8
        blocks = [_DownBlock(channels, channels_at(width, sizes[1]), first=True)]
        blocks += [
            _DownBlock(channels_at(width, a), channels_at(width, b)) for a, b in zip(sizes[1:], sizes[2:])
        ]
        self.blocks = nn.Sequential(*blocks)
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group else None
        extra = 1 if mbstd_group else 0
        self.tail = nn.Sequential(
            _DownBlock(width + extra, width, down=False), _DownBlock(width, width, down=False)
        )
        self.act = nn.ReLU()
        self.head = nn.Linear(width, 1)
        self.project = Projection(num_classes, width) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert x.shape[1:] == self.in_shape, f"D expects {self.in_shape} images, got {tuple(x.shape[1:])}"
        h = self.blocks(x)
        if self.mbstd is not None:
            h = self.mbstd(h)
        phi = self.act(self.tail(h)).sum(dim=(2, 3))
        out = self.head(phi).squeeze(1)
        return out if self.project is None else out + self.project(phi, y)
