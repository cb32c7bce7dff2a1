"""Generator and discriminator architectures. Plain torch: no DeepSpeed, Ray or MLflow here."""

from __future__ import annotations

from torch import nn

from trainer.models.dcgan import DCGANDiscriminator, DCGANGenerator
from trainer.models.layers import MinibatchStd, spectral_norm_all
from trainer.models.mlp import MLPDiscriminator, MLPGenerator
from trainer.models.resnet import ResNetDiscriminator, ResNetGenerator


def build_pair(
    arch: str,
    latent_dim: int,
    *,
    resolution: int = 32,
    channels: int = 1,
    g_width: int = 256,
    d_width: int = 256,
    depth: int = 3,
    spectral_norm: str = "none",
    mbstd_group: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """(G, D) for `arch`: 'mlp' for 2-D points, 'dcgan' or 'resnet' for images.

    `spectral_norm`: 'none', 'd' (every D layer) or 'both'; `mbstd_group` > 0 adds a minibatch
    stddev feature to D over groups of that many consecutive samples.
    """
    if arch == "mlp":
        G, D = MLPGenerator(latent_dim, g_width, depth), MLPDiscriminator(d_width, depth, mbstd_group)
    elif arch == "dcgan":
        G = DCGANGenerator(latent_dim, resolution, channels, g_width)
        D = DCGANDiscriminator(resolution, channels, d_width, mbstd_group)
    elif arch == "resnet":
        G = ResNetGenerator(latent_dim, resolution, channels, g_width)
        D = ResNetDiscriminator(resolution, channels, d_width, mbstd_group)
    else:
        raise ValueError(f"unknown arch {arch!r}; allowed: mlp, dcgan, resnet")
    if spectral_norm in ("d", "both"):
        spectral_norm_all(D)
    if spectral_norm == "both":
        spectral_norm_all(G)
    return G, D


__all__ = [
    "build_pair",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "MLPGenerator",
    "MLPDiscriminator",
    "ResNetGenerator",
    "ResNetDiscriminator",
    "MinibatchStd",
    "spectral_norm_all",
]
