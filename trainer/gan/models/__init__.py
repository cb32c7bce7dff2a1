"""Generator and discriminator architectures. Plain torch: no DeepSpeed, Ray or MLflow here."""

from __future__ import annotations

from torch import nn

from trainer.config import ModelConfig
from trainer.gan.models.blocks import MinibatchStd, Packed, spectral_norm_all
from trainer.gan.models.dcgan import DCGANDiscriminator, DCGANGenerator
from trainer.gan.models.mlp import MLPDiscriminator, MLPExpertsGenerator, MLPGenerator
from trainer.gan.models.resnet import ResNetDiscriminator, ResNetGenerator


def build_pair(m: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(G, D) as the model section describes them: 'mlp' for 2-D points, 'dcgan' or 'resnet'
    for images (each field's meaning and default: `trainer.config.ModelConfig`).

    `spectral_norm`: 'none', 'd' (every D layer) or 'both'; `mbstd_group` > 0 adds a minibatch
    stddev feature to D over groups of that many consecutive samples; `g_experts` > 0 (mlp
    only) makes G that many separate MLPs of width `g_width`, z[:, 0] picking one, equally likely
    or (`g_expert_prior='learned'`) by a learned prior. `conditional` (dcgan, resnet): G with
    class-conditional batch norm and a projection D over `num_classes` classes. `pack` > 1: D
    scores packs of that many samples (`Packed`, PacGAN).
    """
    arch, latent_dim, resolution, channels = m.arch, m.latent_dim, m.resolution, m.channels
    g_width, d_width, depth, mbstd_group = m.g_width, m.d_width, m.depth, m.mbstd_group
    classes = m.num_classes if m.conditional else 0
    d_channels = channels * m.pack  # a pack's samples lie side by side along channels
    if m.conditional and (arch == "mlp" or m.num_classes < 2):
        raise ValueError(f"conditional needs an image arch and num_classes >= 2, got {arch}, {m.num_classes}")
    if m.g_experts and arch != "mlp":
        raise ValueError(f"g_experts is for the mlp pair, not {arch!r}")
    if arch == "mlp":
        G = (
            MLPExpertsGenerator(latent_dim, m.g_experts, g_width, depth, m.g_expert_prior == "learned")
            if m.g_experts
            else MLPGenerator(latent_dim, g_width, depth)
        )
        D = MLPDiscriminator(d_width, depth, mbstd_group, points=2 * m.pack)
    elif arch == "dcgan":
        G = DCGANGenerator(latent_dim, resolution, channels, g_width, classes)
        D = DCGANDiscriminator(resolution, d_channels, d_width, mbstd_group, classes)
    elif arch == "resnet":
        G = ResNetGenerator(latent_dim, resolution, channels, g_width, classes)
        D = ResNetDiscriminator(resolution, d_channels, d_width, mbstd_group, classes)
    else:
        raise ValueError(f"unknown arch {arch!r}; allowed: mlp, dcgan, resnet")
    if m.spectral_norm in ("d", "both"):
        spectral_norm_all(D)
    if m.spectral_norm == "both":
        spectral_norm_all(G)
    return G, (Packed(D, m.pack) if m.pack > 1 else D)


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
    "Packed",
    "spectral_norm_all",
]
