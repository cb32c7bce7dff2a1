"""Exponential moving average of the generator's weights: what gets sampled and registered."""

from __future__ import annotations

import copy

import torch
from torch import nn

from trainer.gan.schedule import EMADecay


class EMA:
    """An fp32 copy of G updated as ema <- d * ema + (1 - d) * G after every G step.

    The decay `d` comes from `schedule.EMADecay`: a fixed decay ramped up as
    min(decay, (1 + t) / (10 + t)) so that early on the average does not hold on to the random
    initialisation (t = number of updates), or a half-life in images (StyleGAN2-ADA's ema_kimg).
    """

    def __init__(self, module: nn.Module, decay: float | EMADecay):
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)
        self.schedule = decay if isinstance(decay, EMADecay) else EMADecay(decay)
        self.decay = self.schedule.decay
        self.num_updates = 0

    def current_decay(self) -> float:
        return self.schedule.at(self.num_updates)

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.module.parameters())
        src_params = [
            p.detach().to(device=e.device, dtype=torch.float32)
            for e, p in zip(ema_params, source.parameters())
        ]
        torch._foreach_lerp_(ema_params, src_params, 1.0 - d)
        # BatchNorm running statistics are copied, not averaged.
        for e, b in zip(self.module.buffers(), source.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
