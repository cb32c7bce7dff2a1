"""The seed article's DCGAN pair, corrected.

Fixes against the seed: output channels come from the data (the seed hard-codes 3 against
1-channel MNIST); the feature pyramid is built for 32 or 64 px from a 4x4 base; D has no
BatchNorm or dropout, so gradient penalties see a per-sample function.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.gan.models.blocks import MinibatchStd, Projection, batch_norm, labels_from_latent, norm


class DCGANGenerator(nn.Module):
    """z (N, latent_dim) [, labels (N,)] -> images (N, channels, resolution, resolution) in [-1, 1].

    With `num_classes` > 0 its batch norms are class-conditional; called without labels it
    draws them from z (`labels_from_latent`)."""

    def __init__(self, latent_dim: int, resolution: int, channels: int, width: int, num_classes: int):
        super().__init__()
        if resolution not in (32, 64):
            raise ValueError(f"DCGAN resolution must be 32 or 64, got {resolution}")
        self.latent_dim = latent_dim
        self.out_shape = (channels, resolution, resolution)
        n_up = int(math.log2(resolution)) - 2  # 4x4 -> resolution
        ch = width * 2 ** (n_up - 1)
        self.base_channels, self.num_classes = ch, num_classes
        self.project = nn.Sequential(
            nn.Linear(latent_dim, ch * 16, bias=False), batch_norm(ch * 16, num_classes, dims=1), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        for _ in range(n_up - 1):
            blocks += [
                nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False),
                batch_norm(ch // 2, num_classes),
                nn.ReLU(),
            ]
            ch //= 2
        blocks += [nn.ConvTranspose2d(ch, channels, 4, stride=2, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and y is None:
            y = labels_from_latent(z, self.num_classes)
        x = z
        for layer in self.project:
            x = norm(layer, x, y)
        x = x.view(z.shape[0], self.base_channels, 4, 4)
        for layer in self.body:
            x = norm(layer, x, y)
        out = x
        assert out.shape[1:] == self.out_shape, (out.shape, self.out_shape)
        return out


class DCGANDiscriminator(nn.Module):
    """images (N, channels, resolution, resolution) [, labels (N,)] -> logits (N,); with
    `num_classes` > 0 a projection discriminator."""

    def __init__(self, resolution: int, channels: int, width: int, mbstd_group: int, num_classes: int):
        super().__init__()
        if resolution not in (32, 64):
            raise ValueError(f"DCGAN resolution must be 32 or 64, got {resolution}")
        self.in_shape = (channels, resolution, resolution)
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group else None
        n_down = int(math.log2(resolution)) - 2
        layers: list[nn.Module] = []
        ch_in, ch = channels, width
        for _ in range(n_down):
            layers += [nn.Conv2d(ch_in, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch_in, ch = ch, ch * 2
        self.body = nn.Sequential(*layers)
        features = (ch_in + (1 if mbstd_group else 0)) * 16
        self.head = nn.Linear(features, 1)
        self.project = Projection(num_classes, features) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert x.shape[1:] == self.in_shape, f"D expects {self.in_shape} images, got {tuple(x.shape[1:])}"
        h = self.body(x)
        if self.mbstd is not None:
            h = self.mbstd(h)
        phi = h.flatten(1)
        out = self.head(phi).squeeze(1)
        return out if self.project is None else out + self.project(phi, y)
