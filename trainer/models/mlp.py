"""The MLP pair used on the 2-D mode-collapse benchmarks (ring8, grid25)."""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.layers import LeakyReLU, MinibatchStd


def _mlp(sizes: list[int], act: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act)
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """z (N, latent_dim) -> points (N, 2)."""

    def __init__(self, latent_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.latent_dim = latent_dim
        self.out_shape = (2,)
        self.net = _mlp([latent_dim] + [width] * depth + [2], nn.ReLU())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """points (N, 2) -> logits (N,); optionally with minibatch stddev before the last layer."""

    def __init__(self, width: int = 256, depth: int = 3, mbstd_group: int = 0):
        super().__init__()
        # layers.LeakyReLU: the penalties' double backward skips D's forward graph.
        self.net = _mlp([2] + [width] * depth, LeakyReLU(0.2))
        self.act = LeakyReLU(0.2)
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group else None
        self.head = nn.Linear(width + (1 if mbstd_group else 0), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.net(x))
        if self.mbstd is not None:
            h = self.mbstd(h)
        return self.head(h).squeeze(1)
