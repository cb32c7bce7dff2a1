"""Building blocks the architectures share: minibatch stddev and spectral norm."""

from __future__ import annotations

import torch
from torch import nn


class MinibatchStd(nn.Module):
    """Appends the mean standard deviation over a group of samples as one more feature
    (Karras et al. 2018), so D can see a batch's lack of variety, the signature of collapse.

    Groups are *consecutive* samples: D's fused forward stacks reals then fakes, so with a
    batch size divisible by `group` no group mixes the two (StyleGAN's strided grouping would).
    """

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        g = self.group if n % self.group == 0 else 1  # a ragged batch: per-sample (std 0)
        y = x.reshape(n // g, g, *x.shape[1:]).float()
        std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt()  # per group and feature
        feat = std.flatten(1).mean(1).to(x.dtype)  # one number per group
        feat = feat.repeat_interleave(g).reshape(n, *([1] * (x.dim() - 1)))
        return torch.cat([x, feat.expand(n, 1, *x.shape[2:])], dim=1)


def spectral_norm_all(module: nn.Module) -> nn.Module:
    """Spectral normalization (Miyato et al. 2018) on every Linear and conv layer of `module`."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.utils.parametrizations.spectral_norm(m)
    return module
