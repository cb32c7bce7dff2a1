"""The MLP pair used on the 2-D mode-collapse benchmarks (ring8, grid25)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.gan.models.blocks import MinibatchStd


def _mlp(sizes: list[int], act: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act)
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """z (N, latent_dim) -> points (N, 2)."""

    def __init__(self, latent_dim: int, width: int, depth: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.out_shape = (2,)
        self.net = _mlp([latent_dim] + [width] * depth + [2], nn.ReLU())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def expert_index(z0: torch.Tensor, k: int) -> torch.Tensor:
    """One of k equally likely experts from a N(0, 1) coordinate, through the normal CDF."""
    return (0.5 * (1 + torch.erf(z0 / math.sqrt(2))) * k).long().clamp(0, k - 1)


class ExpertLinear(nn.Module):
    """k independent linear maps; each sample goes through the one its expert index picks.

    `weight` is (k, in, out): `stability.SpectralMonitor` reads it as k matrices (`batched`).
    """

    batched = True

    def __init__(self, k: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(k, d_out))

    def forward(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.bmm(h.unsqueeze(1), self.weight[idx]).squeeze(1) + self.bias[idx]


class MLPExpertsGenerator(nn.Module):
    """z (N, latent_dim) -> points (N, 2) from `experts` separate MLPs (model.g_experts).

    z[:, 0] picks an expert (equally likely), which maps z[:, 1:] to a point. A single
    continuous G over a connected latent must put mass on paths between disconnected modes
    (Khayatkhoei et al. 2018, "Disconnected Manifold Learning for GANs"); experts share no
    weights, so no path joins two experts' outputs: on grid25 that mass was most of the
    remaining low-quality samples (experiments/RESULTS.md).

    `learned_prior`: experts are picked by a learned prior instead (z[:, 0]'s normal CDF read
    against its cumulative sum), whose logits G's loss trains (`losses.with_learned_prior`). With
    equally likely experts the mass per mode moves in steps of 1/k: 50 experts over ring8's 8
    modes left one or two hopping between modes to the end.
    """

    def __init__(self, latent_dim: int, experts: int, width: int, depth: int, learned_prior: bool):
        super().__init__()
        if latent_dim < 2:
            raise ValueError(f"an experts G needs latent_dim >= 2 (1 selector + the rest), got {latent_dim}")
        self.latent_dim, self.experts = latent_dim, experts
        self.out_shape = (2,)
        sizes = [latent_dim - 1] + [width] * depth + [2]
        self.layers = nn.ModuleList(ExpertLinear(experts, a, b) for a, b in zip(sizes, sizes[1:]))
        # Logits of a learned prior over the experts; None: equally likely.
        self.prior_logits = nn.Parameter(torch.zeros(experts)) if learned_prior else None

    def choose(self, z0: torch.Tensor) -> torch.Tensor:
        """Each sample's expert: the normal CDF of z0 read against the prior's cumulative sum."""
        if self.prior_logits is None:
            return expert_index(z0, self.experts)
        cdf = torch.cumsum(torch.softmax(self.prior_logits.detach().float(), 0), 0)
        u = 0.5 * (1 + torch.erf(z0.float() / math.sqrt(2)))
        return torch.searchsorted(cdf, u.contiguous()).clamp(max=self.experts - 1)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(expert) of each latent's expert, differentiable in the prior's logits."""
        if self.prior_logits is None:
            raise ValueError("log_prior needs an experts G built with learned_prior=True")
        return torch.log_softmax(self.prior_logits.float(), 0)[self.choose(z[:, 0])]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        idx = self.choose(z[:, 0])
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return self._gathered(z[:, 1:], idx)
        return self._grouped(z[:, 1:], idx)

    def _gathered(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each sample through its expert's gathered weights: static shapes, for torch.export
        (MLflow's pt2 format) and torch.compile."""
        for i, layer in enumerate(self.layers):
            h = layer(h, idx)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h

    def _grouped(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same maps with the samples grouped by expert into a (k, capacity, d) batch, one
        bmm per layer over the weights as they are, instead of gathering a weight matrix per
        sample and scattering its gradient back (several times dearer: benchmarks/RESULTS.md).
        Padding rows are computed and never read.
        The capacity is read on the host: one device sync per forward on a GPU."""
        order = torch.argsort(idx, stable=True)
        sorted_idx = idx[order]
        counts = torch.bincount(sorted_idx, minlength=self.experts)
        pos = torch.arange(len(idx), device=idx.device) - (torch.cumsum(counts, 0) - counts)[sorted_idx]
        x = h.new_zeros(self.experts, int(counts.max()), h.shape[1]).index_put((sorted_idx, pos), h[order])
        for i, layer in enumerate(self.layers):
            x = torch.baddbmm(layer.bias.unsqueeze(1), x, layer.weight)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        y = x[sorted_idx, pos]
        return torch.empty_like(y).index_copy(0, order, y)


class MLPDiscriminator(nn.Module):
    """points (N, `points`) -> logits (N,); optionally with minibatch stddev before the last
    layer (`points` > 2: packs of 2-D points, `Packed`)."""

    def __init__(self, width: int, depth: int, mbstd_group: int, points: int = 2):
        super().__init__()
        # PyTorch layers; trainer.gan.ops gives the activations a cheaper double backward.
        self.net = _mlp([points] + [width] * depth, nn.LeakyReLU(0.2))
        self.act = nn.LeakyReLU(0.2)
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group else None
        self.head = nn.Linear(width + (1 if mbstd_group else 0), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.net(x))
        if self.mbstd is not None:
            h = self.mbstd(h)
        return self.head(h).squeeze(1)
