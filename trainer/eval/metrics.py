"""The metrics, computed from features by the maintained libraries, and the 2-D and
stacked-digits mode scores.

Image metrics (`image_metrics`): FID and KID by torchmetrics (fed precomputed features
through a pass-through module, so the real side can be cached); precision, recall, density and
coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020) as the `prdc` package defines them, but
over blocks of rows (`prdc` holds three full N x N distance matrices, about 30 GB at 50,000
samples; here memory is a block's worth, and a test checks the values against `prdc`'s); and
`memorization`, the fraction of generated samples closer to their nearest real image than 95 %
of the real images are to their own nearest other real image (a generator that copies its
training images scores near 1; fresh data from the same distribution about 0.05: the data's own
row shows it). FID in the digits classifier's feature space is FD-digits. Degenerate
generators: FID and recall/coverage fall when samples are too few kinds; precision and density
alone do not, and memorization catches the copies that every other metric rewards.

2-D (`point_metrics`): PacGAN's mode counts and high-quality fraction, plus numbers that
over-narrow samples cannot fake: `spread` (the per-axis standard deviation of high-quality
samples around their mode, over sigma; the data itself scores about 0.97 since the 3-sigma
cut trims the tails), and two distances to fresh data draws: `swd` (sliced Wasserstein-1; its
floor is set by the mass per mode, so it hardly sees the width of a mode) and `mmd` (Gaussian
kernel of width sigma, which does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import sklearn.metrics
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _PassThrough(nn.Module):
    """Features in, features out: lets torchmetrics compute on cached features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(real: np.ndarray, fake: np.ndarray, seed: int, kid_subsets: int) -> dict[str, float]:
    """FID and KID (mean, std over `kid_subsets` subsets of up to 1,000) by torchmetrics."""
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    # Rank 0 evaluates alone while the other ranks train: a metric that synced its state over
    # the workers' process group (torchmetrics' default) would wait in a collective they never
    # join, and the run would hang at its first evaluation.
    local = {"sync_on_compute": False}
    fid = FrechetInceptionDistance(feature=_PassThrough(r.shape[1]), **local)
    fid.update(r, real=True)
    fid.update(f, real=False)
    size = min(1000, len(r), len(f))
    with warnings.catch_warnings():  # "KID keeps every feature in memory": so do we, by design
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_PassThrough(r.shape[1]), subsets=kid_subsets, subset_size=size, **local
        )
    kid.update(r, real=True)
    kid.update(f, real=False)
    with torch.random.fork_rng(devices=[]):  # KID's subsets come from torch's global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


BLOCK_FLOATS = 1 << 24  # distances held at once by the neighbour metrics (64 MB of float32)
MEMORIZED_QUANTILE = 0.05


def _distance_blocks(x: np.ndarray, y: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Euclidean distances (prdc's metric, by scikit-learn) from blocks of rows of `x` to all of
    `y`: (the rows, their distances), about `BLOCK_FLOATS` values at a time."""
    rows = max(1, BLOCK_FLOATS // max(1, len(y)))
    for start in range(0, len(x), rows):
        block = slice(start, min(start + rows, len(x)))
        yield block, sklearn.metrics.pairwise_distances(x[block], y, metric="euclidean")


def neighbour_distances(x: np.ndarray, ks: tuple[int, ...]) -> np.ndarray:
    """(len(ks), N): each row's distance to its k-th nearest other row for each k in `ks` (the
    row itself is the 0-th)."""
    out = np.empty((len(ks), len(x)), np.float32)
    for block, d in _distance_blocks(x, x):
        out[:, block] = np.partition(d, ks, axis=1)[:, ks].T
    return out


def neighbour_metrics(real: np.ndarray, fake: np.ndarray, nearest_k: int) -> dict[str, float]:
    """Precision, recall, density and coverage (prdc's definitions, k nearest neighbours) and
    memorization, from one pass over the real-fake distances in blocks."""
    real, fake = real.astype(np.float32), fake.astype(np.float32)
    (real_nearest, real_radii), (fake_radii,) = (
        neighbour_distances(real, (1, nearest_k)),
        neighbour_distances(fake, (nearest_k,)),
    )
    inside = np.zeros(len(fake), np.int64)  # how many real neighbourhoods hold each fake
    recalled, covered = np.zeros(len(real), bool), np.zeros(len(real), bool)
    nearest_real = np.full(len(fake), np.inf, np.float32)
    for block, d in _distance_blocks(real, fake):
        inside += (d < real_radii[block, None]).sum(0)
        recalled[block] = (d < fake_radii[None, :]).any(1)
        covered[block] = d.min(1) < real_radii[block]
        nearest_real = np.minimum(nearest_real, d.min(0))
    near = np.quantile(real_nearest, MEMORIZED_QUANTILE)
    return {
        "precision": float((inside > 0).mean()),
        "recall": float(recalled.mean()),
        "density": float(inside.mean() / nearest_k),
        "coverage": float(covered.mean()),
        "memorization": float((nearest_real < near).mean()),
    }


def image_metrics(
    real: np.ndarray, fake: np.ndarray, nearest_k: int, seed: int, kid_subsets: int
) -> dict[str, float]:
    """Every image metric on (N, F) real and fake features (the settings: `EvalConfig`)."""
    return {**fid_kid(real, fake, seed, kid_subsets), **neighbour_metrics(real, fake, nearest_k)}


# --- 2-D mixtures ------------------------------------------------------------------------------


def mode_metrics(points: np.ndarray, modes: np.ndarray, sigma: float) -> dict[str, float]:
    """PacGAN (Lin et al. 2018) definitions on generated 2-D points, plus `spread`.

    A sample is high quality when it lies within 3 sigma of its nearest mode; a mode is covered
    when at least one high-quality sample is nearest to it; reverse KL is KL(p || uniform) of
    the high-quality samples' distribution over modes (0 = perfectly balanced; when no
    sample is high quality it is log(number of modes), the worst case).
    """
    dist = np.linalg.norm(points[:, None, :] - modes[None, :, :], axis=2)
    nearest, good = dist.argmin(1), dist.min(1) < 3 * sigma
    counts = np.bincount(nearest[good], minlength=len(modes)).astype(np.float64)
    if counts.sum() == 0:
        kl, spread = math.log(len(modes)), 0.0
    else:
        p = counts / counts.sum()
        kl = float(np.sum(p[p > 0] * np.log(p[p > 0] * len(modes))))
        spread = float(np.sqrt(np.mean(dist.min(1)[good] ** 2) / 2) / sigma)
    return {
        "modes_covered": float((counts > 0).sum()),
        "high_quality": float(good.mean()),
        "reverse_kl": kl,
        "spread": spread,
    }


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two equal-sized point sets (fixed directions)."""
    n = min(len(a), len(b))
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((a.shape[1], projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    pa, pb = np.sort(a[:n] @ theta, axis=0), np.sort(b[:n] @ theta, axis=0)
    return float(np.abs(pa - pb).mean())


def _kernel_mean(a: torch.Tensor, b: torch.Tensor, bandwidth: float, chunk: int = 2048) -> float:
    """Mean of exp(-|x - y|^2 / (2 bandwidth^2)) over all pairs, in row chunks."""
    total = 0.0
    for start in range(0, len(a), chunk):
        d2 = torch.cdist(a[start : start + chunk], b).square_()
        total += float(d2.div_(-2 * bandwidth**2).exp_().sum(dtype=torch.float64))
    return total / (len(a) * len(b))


def mmd(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    """Maximum mean discrepancy with a Gaussian kernel (the biased estimate, square-rooted:
    never negative; two samples of one distribution score about sqrt(2 / n))."""
    x, y = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    sq = _kernel_mean(x, x, bandwidth) + _kernel_mean(y, y, bandwidth) - 2 * _kernel_mean(x, y, bandwidth)
    return math.sqrt(max(sq, 0.0))


def point_metrics(points: np.ndarray, modes: np.ndarray, sigma: float, fresh: np.ndarray) -> dict[str, float]:
    """Mode metrics plus two distances to `fresh` data draws: sliced Wasserstein (the global
    layout and the mass per mode) and MMD with a kernel at the modes' own width sigma (the shape
    of each mode: samples piled on the centres score far above the data's floor)."""
    out = mode_metrics(points, modes, sigma)
    return {**out, "swd": sliced_wasserstein(points, fresh), "mmd": mmd(points, fresh, sigma)}


# --- stacked digits ----------------------------------------------------------------------------


def stacked_modes(labels: np.ndarray, classes: int = 10) -> dict[str, float]:
    """Modes covered (of classes**C) and KL(p || uniform) of the mode histogram, from (N, C)
    per-channel labels (VEEGAN / PacGAN's Stacked-MNIST score)."""
    c = labels.shape[1]
    mode = (labels * (classes ** np.arange(c - 1, -1, -1))).sum(1)
    counts = np.bincount(mode, minlength=classes**c).astype(np.float64)
    p = counts / counts.sum()
    kl = float(np.sum(p[p > 0] * np.log(p[p > 0] * classes**c)))
    return {"modes": float((counts > 0).sum()), "mode_kl": kl}
