"""Stability signals: what to watch so that a diverging or collapsing run shows it early.

Cheap per-step values (losses, D gap and accuracies, global grad norms, penalty, non-finite
count) come from `GANStep`; this module adds the periodic probes, run every
`stability.every` steps on rank 0's models, and the end-of-run summary:

- top singular value of every weight matrix of G and D (power iteration with persistent
  vectors, as BigGAN monitors to foresee collapse);
- per-layer-group gradient norms of G and D (one extra forward/backward on a probe batch,
  through `torch.autograd.grad`, so optimizer state and `.grad` are untouched);
- for 2-D data: modes covered, high-quality fraction, reverse KL (PacGAN's definitions) and
  spread (`trainer.eval.metrics.mode_metrics`);
  for images: a diversity score and a near-duplicate rate on a fixed latent batch;
- loss moving mean and variance (exponentially weighted) and their z-score;
- `summarize`: diverged or not, when, and which signal moved first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from trainer.eval.metrics import mode_metrics

# --- image diversity -------------------------------------------------------------------------


def diversity(images: torch.Tensor, reference: torch.Tensor | None = None, dup_frac: float = 0.1) -> dict:
    """Mean pairwise L2 distance of a fixed batch (divided by the same for `reference`, e.g. a
    real batch, when given) and the fraction of samples whose nearest neighbour in the batch is
    closer than `dup_frac` of the mean pairwise distance (near-duplicates: a collapse sign)."""
    x = images.detach().float().flatten(1)
    d = torch.cdist(x, x)
    n = len(x)
    off = d[~torch.eye(n, dtype=torch.bool, device=d.device)]
    mean = off.mean()
    nearest = d.clone().fill_diagonal_(float("inf")).min(1).values
    out = {"near_duplicates": float((nearest < dup_frac * mean).float().mean())}
    if reference is not None:
        r = reference.detach().float().flatten(1)
        rd = torch.cdist(r, r)
        ref_mean = rd[~torch.eye(len(r), dtype=torch.bool, device=rd.device)].mean()
        out["diversity"] = float(mean / ref_mean.clamp_min(1e-12))
    else:
        out["diversity"] = float(mean)
    return out


# --- spectral norms --------------------------------------------------------------------------


class SpectralMonitor:
    """Top singular value of each weight (dim >= 2) by power iteration.

    The vectors persist between calls, so one iteration per call tracks the value closely as
    the weights drift slowly; the first call does `warmup` iterations.
    """

    def __init__(self, module: nn.Module, iters: int, warmup: int = 20):
        self.module, self.iters, self.warmup = module, iters, warmup
        self._u: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the vectors: the next call warms up afresh."""
        self._u.clear()

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        out = {}
        for name, m in self.module.named_modules():
            # The weight the layer applies: with spectral norm, the normalized one.
            p = getattr(m, "weight", None)
            if not isinstance(p, torch.Tensor) or p.dim() < 2:
                continue
            if getattr(m, "batched", False):  # (k, in, out): k matrices (an experts G); the largest
                w = p.detach().float().transpose(1, 2)
            else:
                w = p.detach().float().reshape(1, p.shape[0], -1)
            u = self._u.get(name)
            iters = self.iters
            if u is None or not bool(torch.isfinite(u).all()):  # first call, or NaN weights passed by
                u = torch.randn(w.shape[:2], generator=torch.Generator().manual_seed(0)).to(w.device)
                iters = self.warmup
            for _ in range(iters):
                v = nn.functional.normalize((w.transpose(1, 2) @ u.unsqueeze(2)).squeeze(2), dim=1, eps=1e-12)
                u = nn.functional.normalize((w @ v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-12)
            self._u[name] = u
            out[name or "weight"] = float((u.unsqueeze(1) @ w @ v.unsqueeze(2)).max())
        return out


# --- per-layer-group gradient norms ----------------------------------------------------------


def _short(name: str) -> str:
    """A compact, MLflow-safe name for a parameter: 'net.0.weight' -> 'net.0'."""
    for suffix in (".weight", ".weight_orig", ".parametrizations.weight.original", ".bias"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace(".parametrizations", "")


def group_grad_norms(module: nn.Module, loss: torch.Tensor) -> dict[str, float]:
    """L2 norm of d loss / d params per layer (weight and bias together), plus the total.

    Uses `autograd.grad`, so `.grad` buffers and any optimizer or engine state stay untouched.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    sq: dict[str, float] = {}
    for (name, _), g in zip(named, grads):
        if g is not None:
            key = _short(name)
            sq[key] = sq.get(key, 0.0) + float(g.detach().float().square().sum())
    out = {k: math.sqrt(v) for k, v in sq.items()}
    out["total"] = math.sqrt(sum(sq.values()))
    return out


# --- loss moving statistics ------------------------------------------------------------------


class EWStats:
    """Exponentially weighted mean and variance of a scalar; `z` of the newest value."""

    def __init__(self, alpha: float = 0.1):
        self.alpha, self.mean, self.var, self.n = alpha, 0.0, 0.0, 0

    def update(self, x: float) -> float:
        """Add `x`; return its z-score against the statistics before it (0 while warming up)."""
        if not math.isfinite(x):
            return float("inf")
        if self.n == 0:
            self.mean, self.n = x, 1
            return 0.0
        z = (x - self.mean) / math.sqrt(self.var + 1e-12) if self.n >= 5 else 0.0
        d = x - self.mean
        self.mean += self.alpha * d
        self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.n += 1
        return z

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.n = state["mean"], state["var"], state["n"]


# --- the probe that the loop runs every `stability.every` steps ------------------------------


class Probe:
    """Everything periodic, on one rank's modules; returns flat metrics for MLflow."""

    def __init__(
        self,
        G: nn.Module,
        D: nn.Module,
        ema_G: Callable[[], nn.Module],
        latent_dim: int,
        d_loss: Callable,
        g_loss: Callable,
        modes: np.ndarray | None = None,
        sigma: float = 0.0,
        num_samples: int = 2500,
        power_iters: int = 1,
    ):
        self.G, self.D, self.ema_G = G, D, ema_G
        self.d_loss, self.g_loss = d_loss, g_loss
        self.latent_dim, self.modes, self.sigma = latent_dim, modes, sigma
        self.num = num_samples if modes is not None else min(num_samples, 256)
        self.z = torch.randn(self.num, latent_dim, generator=torch.Generator().manual_seed(1234))
        self.sn = {"G": SpectralMonitor(G, power_iters), "D": SpectralMonitor(D, power_iters)}
        self.reset()

    def reset(self) -> None:
        """Start the loss statistics and power iterations afresh (after a rollback they
        describe an abandoned branch, and its NaN weights would have poisoned the vectors)."""
        self.loss_stats = {"d_loss": EWStats(), "g_loss": EWStats()}
        for monitor in self.sn.values():
            monitor.reset()

    def __call__(self, real: torch.Tensor, step_metrics: dict[str, float]) -> dict[str, float]:
        # Forwards in training mode move BatchNorm statistics and spectral-norm vectors: put
        # them back, so that this rank stays identical to the others.
        saved = [b.detach().clone() for m in (self.G, self.D) for b in m.buffers()]
        try:
            return self._probe(real, step_metrics)
        finally:
            with torch.no_grad():
                for b, v in zip((b for m in (self.G, self.D) for b in m.buffers()), saved):
                    b.copy_(v)

    def _probe(self, real: torch.Tensor, step_metrics: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for net, mon in self.sn.items():
            values = mon()
            out.update({f"sn/{net}/{k}": v for k, v in values.items()})
            out[f"sn/{net}/max"] = max(values.values())
        out.update(self._grad_groups(real))
        for key, stats in self.loss_stats.items():
            if key in step_metrics:
                out[f"{key}_z"] = stats.update(step_metrics[key])
                out[f"{key}_ewm"], out[f"{key}_ewv"] = stats.mean, stats.var
        if "d_real" in step_metrics and "d_fake" in step_metrics:
            out["d_gap"] = step_metrics["d_real"] - step_metrics["d_fake"]
        out.update(self._samples(real))
        return out

    def _grad_groups(self, real: torch.Tensor) -> dict[str, float]:
        dev = next(self.G.parameters()).device
        dtype = next(self.D.parameters()).dtype
        real = real[:256].to(dev, dtype)
        z = torch.randn(len(real), self.latent_dim, generator=torch.Generator().manual_seed(99)).to(dev)
        out = {}
        fake = self.G(z.to(next(self.G.parameters()).dtype))
        real_logits = self.D(real)
        d = group_grad_norms(self.D, self.d_loss(real_logits, self.D(fake.detach().to(dtype))))
        g = group_grad_norms(self.G, self.g_loss(self.D(fake.to(dtype)), real_logits.detach()))
        out.update({f"grad/D/{k}": v for k, v in d.items()})
        out.update({f"grad/G/{k}": v for k, v in g.items()})
        return out

    @torch.no_grad()
    def _samples(self, real: torch.Tensor) -> dict[str, float]:
        G = self.ema_G()
        was = G.training
        G.eval()
        p = next(G.parameters())
        x = G(self.z.to(p.device, p.dtype)).float().cpu()
        G.train(was)
        spread = diversity(x, real[: len(x)].float().cpu())
        if self.modes is not None:
            # The benchmark's true modes: monitoring only. The guard reads `diversity`, which
            # needs nothing but real samples (a point's nearest neighbour is always near: no
            # near-duplicate rate for points).
            return {**mode_metrics(x.numpy(), self.modes, self.sigma), "diversity": spread["diversity"]}
        return spread


# --- end-of-run summary ----------------------------------------------------------------------

# Signals, the direction in which each moves when a run goes wrong, and the z-score that counts.
WATCH = {
    "nonfinite": +1,
    "d_loss": -1,  # D wins: its loss drops
    "g_loss": +1,
    "d_gap": +1,
    "d_grad_norm": +1,
    "g_grad_norm": +1,
    "sn/D/max": +1,
    "sn/G/max": +1,
    "modes_covered": -1,
    "high_quality": -1,
    "diversity": -1,
    "near_duplicates": +1,
}


def summarize(history: dict[str, list[tuple[int, float]]], z_threshold: float = 4.0) -> dict:
    """Diverged or not, when, and which signal moved first (step-indexed metric histories).

    Diverged means: a non-finite loss or gradient, or the final mode coverage / diversity
    below half its best. Each watched signal's first move is its first value beyond
    `z_threshold` exponentially weighted standard deviations in its bad direction.
    """
    first_moves: dict[str, int] = {}
    for key, sign in WATCH.items():
        series = history.get(key, [])
        stats = EWStats(alpha=0.2)
        for step, value in series:
            z = stats.update(value)
            if (not math.isfinite(value)) or (math.isfinite(z) and sign * z > z_threshold):
                first_moves[key] = step
                break
    reasons = []
    nonfinite = [s for s, v in history.get("nonfinite", []) if v > 0 or not math.isfinite(v)]
    if nonfinite:
        reasons.append(("nonfinite", nonfinite[0]))
    for key in ("modes_covered", "diversity"):
        values = [v for _, v in history.get(key, [])]
        if len(values) >= 2 and values[-1] < 0.5 * max(values):
            peak = values.index(max(values))
            after = next(i for i in range(peak, len(values)) if values[i] < 0.5 * values[peak])
            reasons.append((key, history[key][after][0]))
    diverged = bool(reasons)
    at = min(s for _, s in reasons) if reasons else None
    moved = sorted(first_moves.items(), key=lambda kv: kv[1])
    first = moved[0][0] if moved else (reasons[0][0] if reasons else "")
    return {
        "diverged": diverged,
        "diverged_at": at,
        "reasons": [r for r, _ in reasons],
        "first_signal": first,
        "first_moves": dict(moved),
    }
