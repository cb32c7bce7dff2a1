"""Generator and discriminator architectures. Plain torch: no DeepSpeed, Ray or MLflow here."""

from __future__ import annotations

from torch import nn

from trainer.gan.models.blocks import MinibatchStd, spectral_norm_all
from trainer.gan.models.dcgan import DCGANDiscriminator, DCGANGenerator
from trainer.gan.models.mlp import MLPDiscriminator, MLPExpertsGenerator, MLPGenerator
from trainer.gan.models.resnet import ResNetDiscriminator, ResNetGenerator


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
    g_experts: int = 0,
    g_expert_prior: str = "uniform",
    conditional: bool = False,
    num_classes: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """(G, D) for `arch`: 'mlp' for 2-D points, 'dcgan' or 'resnet' for images.

    `spectral_norm`: 'none', 'd' (every D layer) or 'both'; `mbstd_group` > 0 adds a minibatch
    stddev feature to D over groups of that many consecutive samples; `g_experts` > 0 (mlp
    only) makes G that many separate MLPs of width `g_width`, z[:, 0] picking one, equally likely
    or (`g_expert_prior='learned'`) by a learned prior. `conditional` (dcgan, resnet): G with
    class-conditional batch norm and a projection D over `num_classes` classes.
    """
    classes = num_classes if conditional else 0
    if conditional and (arch == "mlp" or num_classes < 2):
        raise ValueError(f"conditional needs an image arch and num_classes >= 2, got {arch}, {num_classes}")
    if g_experts and arch != "mlp":
        raise ValueError(f"g_experts is for the mlp pair, not {arch!r}")
    if arch == "mlp":
        G = (
            MLPExpertsGenerator(latent_dim, g_experts, g_width, depth, g_expert_prior == "learned")
            if g_experts
            else MLPGenerator(latent_dim, g_width, depth)
        )
        D = MLPDiscriminator(d_width, depth, mbstd_group)
    elif arch == "dcgan":
        G = DCGANGenerator(latent_dim, resolution, channels, g_width, classes)
        D = DCGANDiscriminator(resolution, channels, d_width, mbstd_group, classes)
    elif arch == "resnet":
        G = ResNetGenerator(latent_dim, resolution, channels, g_width, classes)
        D = ResNetDiscriminator(resolution, channels, d_width, mbstd_group, classes)
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
    "MLPExpertsGenerator",
    "MLPDiscriminator",
    "ResNetGenerator",
    "ResNetDiscriminator",
    "MinibatchStd",
    "spectral_norm_all",
]
