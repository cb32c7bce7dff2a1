"""Differentiable augmentation of what D sees: DiffAugment's transforms (Zhao et al. 2020) with
a fixed probability, or ADA's adaptive one (Karras et al. 2020).

Invariants:
- Reals and fakes pass through the same kind of random transforms, in D's step and in G's
  step alike, so D never sees an unaugmented image and cannot tell real from fake by the
  augmentation. The transforms are differentiable in the image: G's gradient flows through them.
- Nothing outside `GANStep`'s D calls is augmented: samples, the EMA generator, evaluation and
  the registered model see G's output as it is. G may still learn to imitate an augmentation
  (a "leak") when a transform is applied too often; whether it did is measured on samples
  (experiments/augmentation.py scores them with the digits classifier), not assumed.
- Each transform is applied to each sample independently with probability `p`; at p = 0 the
  input comes back unchanged (the same tensor).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from trainer.config import AUGMENT_POLICIES


def _rand(n: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, 1, 1, 1, generator=g).to(like.device, like.dtype)


def color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5] (images in [-1, 1])."""
    n = len(x)
    x = x + (_rand(n, g, x) - 0.5)
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_rand(n, g, x) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(n, g, x) + 0.5) + mean


def translation(x: torch.Tensor, g: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size in x and y, zeros shifted in."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), generator=g).to(x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), generator=g).to(x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy + sh).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx + sw).expand(n, h, w)
    padded = F.pad(x, [sw, sw, sh, sh])
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, g: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of `ratio` x the image size at a random place in each image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=g).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=g).to(x.device)
    top, left = cy - ch // 2, cx - cw // 2  # the square may hang over the border
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}
assert tuple(TRANSFORMS) == AUGMENT_POLICIES  # the config checks names against the same list


class Augment:
    """D's input augmentation: `policy` transforms, each applied per sample with probability
    `p` (fixed for DiffAugment, steered by `adjust` for ADA)."""

    def __init__(self, policy: tuple[str, ...], p: float, generator: torch.Generator):
        unknown = [t for t in policy if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; allowed: {', '.join(TRANSFORMS)}")
        self.policy, self.p, self.g = policy, p, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or x.dim() != 4:
            return x
        for name in self.policy:
            out = TRANSFORMS[name](x, self.g)
            if self.p < 1:
                keep = torch.rand(len(x), 1, 1, 1, generator=self.g).to(x.device) >= self.p
                out = torch.where(keep, x, out)
            x = out
        return x

    def adjust(self, r_t: float, target: float, images: int, speed_images: float) -> float:
        """ADA's controller: p moves toward more augmentation while D's sign on reals
        (r_t = E[sign D(real)], 1 when D is sure of every real: overfitting) is above `target`,
        by images / speed_images per adjustment (0 -> 1 in `speed_images` images), in [0, 1]."""
        step = images / speed_images
        self.p = min(max(self.p + (step if r_t > target else -step), 0.0), 1.0)
        return self.p
