"""Hyperparameter schedules over training: the learning rates (linear or cosine, to a fraction of
their start), Adam's beta2 and the penalty weight (cosine from start to end, as R3GAN's
`cosine_decay_with_warmup` without warm-up), and the EMA's decay from a half-life in images
(StyleGAN2-ADA's `ema_kimg` with `ema_rampup`). Pure functions of the step; the worker applies
them, so a resumed run follows the same curve as an unbroken one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import Config, OptimConfig, PenaltyConfig


def cosine(start: float, end: float, step: int, steps: int) -> float:
    """`start` at step 0 to `end` at `steps` along half a cosine, then `end`."""
    frac = min(step / steps, 1.0) if steps > 0 else 1.0
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_scale(o: OptimConfig, step: int, max_steps: int) -> float:
    """Both learning rates' factor at `step` (1 at the start; `lr_final_scale` at the end of
    `schedule_steps`, 0 = max_steps)."""
    steps = o.schedule_steps or max_steps
    end = o.lr_final_scale
    if o.lr_schedule == "linear":
        return end + (1.0 - end) * (1.0 - min(step / steps, 1.0))
    if o.lr_schedule == "cosine":
        return cosine(1.0, end, step, steps)
    return 1.0


def beta2(o: OptimConfig, step: int, max_steps: int) -> float:
    """Adam's beta2 at `step`: `beta2`, or its cosine to `beta2_end`."""
    if o.beta2_end is None:
        return o.beta2
    return cosine(o.beta2, o.beta2_end, step, o.schedule_steps or max_steps)


def penalty_scale(p: PenaltyConfig, gamma: float, o: OptimConfig, step: int, max_steps: int) -> float:
    """The penalty weight's factor at `step` against its start `gamma` (the guard's own raises
    multiply on top): 1, or the cosine to `weight_end / gamma`."""
    if p.weight_end is None or gamma <= 0:
        return 1.0
    return cosine(1.0, p.weight_end / gamma, step, o.schedule_steps or max_steps)


def at_step(cfg: Config, gamma: float, step: int) -> tuple[float, float, float]:
    """(lr factor, beta2, penalty factor) at `step`, as `GANStep.set_hparams` takes them (the
    guard's own lr scale multiplies the first)."""
    o, t = cfg.optim, cfg.trainer.max_steps
    return lr_scale(o, step, t), beta2(o, step, t), penalty_scale(cfg.penalty, gamma, o, step, t)


@dataclass(frozen=True)
class EMADecay:
    """The EMA's decay per G step: `decay` fixed, or from a half-life of `kimg` thousand images
    at `batch` images per step (StyleGAN2-ADA: 0.5 ** (batch / ema_nimg)), the half-life at most
    `rampup` times the images seen before the step when `rampup` > 0."""

    decay: float
    kimg: float = 0.0
    rampup: float = 0.0
    batch: int = 1

    def at(self, updates: int) -> float:
        """The decay for the update after `updates` earlier ones."""
        if self.kimg <= 0:  # a fixed decay, ramped so the average forgets the initialisation
            return min(self.decay, (1 + updates) / (10 + updates))
        half_life = self.kimg * 1000.0
        if self.rampup > 0:
            half_life = min(half_life, updates * self.batch * self.rampup)
        return 0.5 ** (self.batch / max(half_life, 1e-8))
