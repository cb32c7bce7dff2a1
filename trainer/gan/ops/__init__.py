"""Double-backward ops for D, applied from outside the model (as StyleGAN2-ADA isolates
`conv2d_gradfix`): D's are written with PyTorch's layers, and `apply(D)` gives their
`nn.Conv2d`, `nn.Linear`, `nn.LeakyReLU`, `nn.ReLU` and 2x2 `nn.AvgPool2d` a cheaper double
backward (same parameters, state dict and values). `remove(D)` undoes it.

The fast path only acts inside `penalty_forward()`; `no_weight_gradients()` and
`record_outputs()` serve a penalty's inner gradient. The fused R1 / R2 step may take the loss's
gradient from the penalty's pass (`penalties.loss_from_deltas`) only where
`covers_every_weight` finds every weight in a recording layer and `scores_per_sample` finds,
by behaviour, each sample's score depending on that sample alone; otherwise the caller falls
back to the plain backward and says so (`GANStep._can_share_backward`).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.gan.ops.functions import (
    STATE,
    GradientAt,
    _AvgPool2Fn,
    _Conv2dFn,
    _LinearFn,
    _ReLUFn,
    new_slot,
    no_weight_gradients,
    penalty_forward,
    record,
    record_outputs,
)

__all__ = [
    "GradientAt",
    "apply",
    "remove",
    "is_fast",
    "penalty_forward",
    "no_weight_gradients",
    "record_outputs",
    "covers_every_weight",
    "scores_per_sample",
]


class _Fast:
    """The base of every fast layer mixin: `is_fast` is an isinstance check."""


class _FastConv2d(_Fast):
    """Mixin for `nn.Conv2d` (or its spectral-norm parametrized class): `_Conv2dFn` under
    `penalty_forward()`. Grouped, dilated, non-zero- or string-padded convolutions keep
    PyTorch's path."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if not (STATE.penalty_forward and self.records_output()):
            return super()._conv_forward(input, weight, bias)
        slot = new_slot()
        return record(_Conv2dFn.apply(input, weight, bias, self.stride, self.padding, slot), slot)

    def records_output(self) -> bool:
        return (
            self.groups == 1
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        )


class _FastLinear(_Fast):
    """Mixin for `nn.Linear`: `_LinearFn` (which `record_outputs` sees) under `penalty_forward()`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not STATE.penalty_forward:
            return super().forward(input)
        slot = new_slot()
        return record(_LinearFn.apply(input, self.weight, self.bias, slot), slot)

    def records_output(self) -> bool:
        return True


class _FastReLU(_Fast):
    """Mixin for `nn.LeakyReLU` / `nn.ReLU`: a double backward that stops here (`_ReLUFn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not STATE.penalty_forward:
            return super().forward(x)
        return _ReLUFn.apply(x, getattr(self, "negative_slope", 0.0))


class _FastAvgPool2(_Fast):
    """Mixin for `nn.AvgPool2d(2)`: the cut double backward of `_FastReLU` (`_AvgPool2Fn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not STATE.penalty_forward:
            return super().forward(x)
        return _AvgPool2Fn.apply(x)


def _is_2x2_pool(m: nn.Module) -> bool:
    """`_AvgPool2Fn` is a plain 2x2 average: no padding, ceil mode or divisor override."""
    k, s, pad = m.kernel_size, m.stride, m.padding
    return (
        k in (2, (2, 2))
        and s in (2, (2, 2))
        and pad in (0, (0, 0))
        and not m.ceil_mode
        and m.divisor_override is None
    )


_MIXINS: list[tuple[type[nn.Module], type, object]] = [
    (nn.Conv2d, _FastConv2d, None),
    (nn.Linear, _FastLinear, None),
    (nn.LeakyReLU, _FastReLU, None),
    (nn.ReLU, _FastReLU, None),
    (nn.AvgPool2d, _FastAvgPool2, _is_2x2_pool),
]
# PyTorch's class (or a spectral-norm parametrized one: torch makes one per module) -> its fast class
_FAST_CLASSES: dict[type, type] = {}


def _plain_type(m: nn.Module) -> type:
    """The layer's own class: a spectral-norm parametrization subclasses it on the fly."""
    cls = type(m)
    return cls.__bases__[0] if nn.utils.parametrize.is_parametrized(m) else cls


def _fast_class(cls: type, mixin: type) -> type:
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _FAST_CLASSES[cls]


def is_fast(m: nn.Module) -> bool:
    """Whether `apply` gave this layer the fast double backward."""
    return isinstance(m, _Fast)


def apply(module: nn.Module, linear: bool = True) -> nn.Module:
    """Give `module`'s layers the fast double backward, in place (idempotent). Only exact
    PyTorch layer classes (spectral norm included) are swapped; `linear=False` leaves
    `nn.Linear` as it is."""
    for m in module.modules():
        if is_fast(m):
            continue
        plain = _plain_type(m)
        for base, mixin, applies in _MIXINS:
            if plain is base and (base is not nn.Linear or linear) and (applies is None or applies(m)):
                m.__class__ = _fast_class(type(m), mixin)
                break
    return module


def remove(module: nn.Module) -> nn.Module:
    """PyTorch's own layers and double backward again, in place: the textbook reference."""
    for m in module.modules():
        if is_fast(m):
            m.__class__ = type(m).__bases__[1]
    return module


def covers_every_weight(module: nn.Module) -> list[str]:
    """Names of `module`'s parameters that no recording layer holds (empty: all covered)."""
    seen: set[int] = set()
    for m in module.modules():
        if is_fast(m) and getattr(m, "records_output", lambda: False)():
            seen.update(id(p) for p in m.parameters())
    return [name for name, p in module.named_parameters() if id(p) not in seen]


@torch.no_grad()
def scores_per_sample(d_fn, module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `d_fn(x)[i]` depends on `x[i]` alone, by behaviour: the last sample is changed
    and no other score may move. Runs in the module's current mode (batch statistics count),
    restores its buffers (spectral-norm vectors, BatchNorm statistics) and the RNG after."""
    if x.shape[0] < 2:
        return True
    saved = [b.detach().clone() for b in module.buffers()]

    def restore() -> None:  # each forward starts from the same state (spectral norm's vectors)
        for b, s in zip(module.buffers(), saved):
            b.copy_(s)

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        before = d_fn(x)
        restore()
        changed = x.clone()
        changed[-1] = -changed[-1] - 1.0
        after = d_fn(changed)
        restore()
    return torch.allclose(before[:-1].float(), after[:-1].float(), rtol=1e-4, atol=1e-6)
