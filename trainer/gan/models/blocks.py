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


class ConditionalBatchNorm(nn.Module):
    """Class-conditional batch norm (de Vries et al. 2017, as in SNGAN's and BigGAN's cGANs):
    batch statistics without a shared affine, then a per-class gain and bias, starting at 1
    and 0 (plain batch norm's initial affine, for every class)."""

    def __init__(self, num_features: int, num_classes: int, dims: int = 2):
        super().__init__()
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.bn = norm(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (-1, x.shape[1]) + (1,) * (x.dim() - 2)  # no len(x): exports keep a dynamic batch
        return self.bn(x) * self.gain(y).view(shape) + self.bias(y).view(shape)


def norm(layer: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """`layer(x)`, with the labels when it is a `ConditionalBatchNorm`."""
    return layer(x, y) if isinstance(layer, ConditionalBatchNorm) else layer(x)


def batch_norm(num_features: int, num_classes: int, dims: int = 2) -> nn.Module:
    """Plain batch norm, or the class-conditional one when `num_classes` > 0."""
    if num_classes:
        return ConditionalBatchNorm(num_features, num_classes, dims)
    return nn.BatchNorm2d(num_features) if dims == 2 else nn.BatchNorm1d(num_features)


def labels_from_latent(z: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Classes for a conditional G called without labels: Phi(z[:, 0]) cut into `num_classes`
    equal slices, uniform over the classes when z is standard normal, and a pure function of z
    (so unlabelled callers, the evaluator, the probe and one-input exports, get a fixed mix)."""
    u = torch.special.ndtr(z[:, 0].float())
    return (u * num_classes).long().clamp_(0, num_classes - 1)


class Projection(nn.Module):
    """The projection discriminator's class term (Miyato & Koyama 2018): <embed(y), phi(x)>,
    added to D's unconditional logit; 0 without labels."""

    def __init__(self, num_classes: int, num_features: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, num_features)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, phi: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            return phi.new_zeros(phi.shape[0])
        return (self.embed(y).to(phi.dtype) * phi).sum(1)


class Packed(nn.Module):
    """PacGAN's discriminator (Lin et al. 2018): `inner` scores packs of `m` samples, each pack
    the consecutive samples concatenated along channels (N, C, ...) -> (N / m, m * C, ...), so
    D sees whether a set of samples is diverse and G is penalised for collapse. Logits: (N / m,)."""

    def __init__(self, inner: nn.Module, m: int):
        super().__init__()
        self.inner, self.m = inner, m

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if n % self.m:
            raise ValueError(
                f"a packed D (model.pack={self.m}) needs a batch that is a multiple of it, got {n}"
            )
        packed = x.reshape(n // self.m, self.m * x.shape[1], *x.shape[2:])
        return self.inner(packed) if y is None else self.inner(packed, y)
