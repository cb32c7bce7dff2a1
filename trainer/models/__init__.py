"""Generator and discriminator architectures. Plain torch: no DeepSpeed, Ray or MLflow here."""

from __future__ import annotations

from torch import nn

from trainer.models.dcgan import DCGANDiscriminator, DCGANGenerator
from trainer.models.mlp import MLPDiscriminator, MLPGenerator


def build_pair(
    arch: str,
    latent_dim: int,
    *,
    resolution: int = 32,
    channels: int = 1,
    g_width: int = 256,
    d_width: int = 256,
    depth: int = 3,
) -> tuple[nn.Module, nn.Module]:
    """(G, D) for `arch`: 'mlp' for 2-D points, 'dcgan' for images."""
    if arch == "mlp":
        return MLPGenerator(latent_dim, g_width, depth), MLPDiscriminator(d_width, depth)
    if arch == "dcgan":
        return (
            DCGANGenerator(latent_dim, resolution, channels, g_width),
            DCGANDiscriminator(resolution, channels, d_width),
        )
    raise ValueError(f"unknown arch {arch!r}; allowed: mlp, dcgan")


__all__ = ["build_pair", "DCGANGenerator", "DCGANDiscriminator", "MLPGenerator", "MLPDiscriminator"]
