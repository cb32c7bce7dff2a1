"""Stabilizing layers shared by the architectures."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

_input_grad_only = False
_penalty_forward = False
_records: list[dict] | None = None  # see `record_outputs`


@contextlib.contextmanager
def penalty_forward() -> Iterator[None]:
    """Inside, D's layers (`Conv2d`, `LeakyReLU`, `ReLU`, `AvgPool2`) record their forward
    with our autograd Functions, whose graph a penalty differentiates twice more cheaply.

    Outside they run PyTorch's own ops: the same values and first-order gradients with less
    Python per call, which counts where a step is launch-bound (tiny batches on this CPU: a
    DCGAN-32 D forward and backward took 1.08 ms with the Functions, 0.81 ms without). A plain
    global like `input_grad_only`; `penalties.penalty_logits` sets it, for the penalties' own
    forwards and for the D step's forward that R1 / R2 share with the loss.
    """
    global _penalty_forward
    saved, _penalty_forward = _penalty_forward, True
    try:
        yield
    finally:
        _penalty_forward = saved


@contextlib.contextmanager
def input_grad_only() -> Iterator[None]:
    """Inside, `Conv2d`'s backward skips weight and bias gradients.

    For a penalty's inner `autograd.grad(D(x), x, create_graph=True)`: the engine skips them
    for built-in ops, but a custom Function cannot know that only the input's is asked for.
    A plain global, not thread-local: on a GPU the backward runs on the autograd engine's
    device thread, and a penalty's `autograd.grad` is synchronous.
    """
    global _input_grad_only
    saved, _input_grad_only = _input_grad_only, True
    try:
        yield
    finally:
        _input_grad_only = saved


@contextlib.contextmanager
def record_outputs(enabled: bool = True) -> Iterator[list[dict]]:
    """Inside, and under `penalty_forward()`, D's `Conv2d` and `Linear` record each output
    (`"out"`) in the list this yields; a penalty's inner `autograd.grad` then adds the gradient
    of sum(logits) at that output (`"delta"`), and their first-order backward computes weight
    and bias gradients only.

    For the fused R1 / R2 step (`penalties.loss_from_deltas`): D scores each sample on its own,
    so the loss's gradient at a layer's output is the penalty's `delta` times the loss's
    derivative in that sample's logit. Its weight gradients then need no backward pass through
    the layers of their own. Yields an empty list that nothing fills when not `enabled`.
    """
    global _records
    records: list[dict] = []
    saved, _records = _records, (records if enabled else None)
    try:
        yield records
    finally:
        _records = saved


def _record(out: torch.Tensor, slot: dict | None) -> torch.Tensor:
    if slot is not None:
        slot["out"] = out
        _records.append(slot)
    return out


def _new_slot() -> dict | None:
    return {} if _records is not None else None


class _Conv2dFn(torch.autograd.Function):
    """conv2d whose input gradient is taken by `conv_transpose2d`, itself differentiable.

    A gradient penalty differentiates D's input gradient once more. PyTorch's built-in double
    backward of a convolution gets the weight term from a convolution over the batch with the
    output gradient as its (large) kernel: on an H200 that ran cuDNN's generic
    `implicit_convolve_sgemm` at 10 ms of a 17.8 ms R1 step (bf16, batch 1024). Here that term
    is the weight gradient of a transposed convolution, which cuDNN runs as an ordinary wgrad.
    A first-order backward (no graph to keep) is `nn.Conv2d`'s own.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        slot: dict | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias, ctx.slot = stride, padding, bias is not None, slot
        ctx.set_materialize_grads(False)  # see _ReLUFn
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if grad is None:
            return None, None, None, None, None, None
        x, weight = ctx.saved_tensors
        if grad.dtype != weight.dtype:
            # The forward ran under autocast (bf16 conv of fp32 weights); the backward runs
            # outside it, so it casts as autocast did. Under create_graph the casts are
            # recorded, and the double backward reaches the fp32 weights through them.
            x, weight = x.to(grad.dtype), weight.to(grad.dtype)
        want_w = not _input_grad_only and ctx.needs_input_grad[1]
        want_b = not _input_grad_only and ctx.has_bias and ctx.needs_input_grad[2]
        if not torch.is_grad_enabled():
            # A first-order backward (grad mode is on only under create_graph): nn.Conv2d's
            # own call, which computes both gradients in one pass (on this CPU 5 % of a D step
            # faster than a conv_transpose2d plus a weight gradient). A recorded output's
            # gradient comes straight from the loss (`record_outputs`): weights only.
            want_x = ctx.needs_input_grad[0] and ctx.slot is None
            return (
                *torch.ops.aten.convolution_backward(
                    grad, x, weight, [weight.shape[0]] if ctx.has_bias else None,
                    ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1, [want_x, want_w, want_b],
                ),
                None,
                None,
                None,
            )  # fmt: skip
        if ctx.slot is not None:
            ctx.slot["delta"] = grad.detach()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # conv_transpose2d's output size is ambiguous by up to stride - 1 rows: pin it to x's.
            pad = [
                x.shape[i + 2]
                - ((grad.shape[i + 2] - 1) * ctx.stride[i] - 2 * ctx.padding[i] + weight.shape[i + 2])
                for i in range(2)
            ]
            gx = F.conv_transpose2d(grad, weight, None, ctx.stride, ctx.padding, pad)
        if want_w or want_b:
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None,
                ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1, [False, want_w, want_b],
            )  # fmt: skip
        return gx, gw, gb, None, None, None


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and state dict) with a cheaper double backward for D.

    Used in the discriminators, whose input gradient the penalties differentiate twice (see
    `_Conv2dFn`), under `penalty_forward()`. Grouped, dilated, non-zero-padded or string-padded
    convolutions always take `nn.Conv2d`'s own path.
    """

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if not (_penalty_forward and self.records_output()):
            return super()._conv_forward(input, weight, bias)
        slot = _new_slot()
        return _record(_Conv2dFn.apply(input, weight, bias, self.stride, self.padding, slot), slot)

    def records_output(self) -> bool:
        """Whether this convolution takes the custom path (and `record_outputs` sees it)."""
        return (
            self.groups == 1
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        )


class _LinearFn(torch.autograd.Function):
    """linear, for `record_outputs` (its own double backward is PyTorch's: matmuls)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        slot: dict | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.slot = bias is not None, slot
        ctx.set_materialize_grads(False)  # see _ReLUFn
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if grad is None:
            return None, None, None, None
        x, weight = ctx.saved_tensors
        if grad.dtype != weight.dtype:  # autocast, as in _Conv2dFn
            x, weight = x.to(grad.dtype), weight.to(grad.dtype)
        if ctx.slot is not None and torch.is_grad_enabled():
            ctx.slot["delta"] = grad.detach()
        want_x = ctx.needs_input_grad[0] and (ctx.slot is None or torch.is_grad_enabled())
        want_w = not _input_grad_only and ctx.needs_input_grad[1]
        want_b = not _input_grad_only and ctx.has_bias and ctx.needs_input_grad[2]
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = grad @ weight if want_x else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if want_w else None
        gb = g2.sum(0) if want_b else None
        return gx, gw, gb, None


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) that `record_outputs` sees; outside
    `penalty_forward()` it is PyTorch's own."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _penalty_forward:
            return super().forward(input)
        slot = _new_slot()
        return _record(_LinearFn.apply(input, self.weight, self.bias, slot), slot)

    def records_output(self) -> bool:
        return True


def records_every_weight(module: nn.Module) -> bool:
    """Whether `record_outputs` sees every parameter of `module` (D) and D scores each sample on
    its own (no minibatch-stddev), so that `penalties.loss_from_deltas` can stand in for the
    loss's backward."""
    seen: set[int] = set()
    for m in module.modules():
        if isinstance(m, MinibatchStd):
            return False
        if isinstance(m, (Conv2d, Linear)) and m.records_output():
            seen.update(id(p) for p in m.parameters())
    return all(id(p) in seen for p in module.parameters())


class _ReLUFn(torch.autograd.Function):
    """(leaky_)relu whose backward is differentiable in the incoming gradient only.

    The backward multiplies by a mask that is piecewise constant in x, so its derivative in x
    is zero. PyTorch's own double backward still sends those zeros back into D's forward
    graph, and every convolution there then runs its backward on zeros: for WGAN-GP and
    DRAGAN, whose penalty forward is not shared with the loss, two of the step's twelve
    forward-sized passes. Here the penalty's graph never links back to the forward. The
    gradients are PyTorch's, bit for bit.

    No gradient in, none out (`set_materialize_grads(False)`): where the fused R1 / R2 step
    takes its loss's gradients from the penalty's pass (`record_outputs`), none reaches D's
    activations, and materialized zeros would flow through every layer's backward.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.slope = slope
        ctx.set_materialize_grads(False)
        if slope == 0.0:
            out = F.relu(x)
            ctx.save_for_backward(out)  # what F.relu's own backward keeps
            return out
        ctx.save_for_backward(x)
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        if grad is None:
            return None, None
        (saved,) = ctx.saved_tensors
        if ctx.slope == 0.0:
            return torch.ops.aten.threshold_backward(grad, saved.detach(), 0), None
        return torch.ops.aten.leaky_relu_backward(grad, saved.detach(), ctx.slope, False), None


class LeakyReLU(nn.LeakyReLU):
    """`nn.LeakyReLU` for D: under `penalty_forward()`, a penalty's double backward stops here
    instead of running D's forward graph backwards on zeros (see `_ReLUFn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not _penalty_forward:
            return super().forward(x)
        return _ReLUFn.apply(x, self.negative_slope)


class ReLU(nn.ReLU):
    """`nn.ReLU` for D, with the same cut double backward as `LeakyReLU`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace or not _penalty_forward:
            return super().forward(x)
        return _ReLUFn.apply(x, 0.0)


class _AvgPool2Fn(torch.autograd.Function):
    """2x2 average pooling whose backward is differentiable in the incoming gradient only
    (PyTorch's links back to the input, like (leaky_)relu's: see `_ReLUFn`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.size = x.shape[-2:]
        ctx.set_materialize_grads(False)  # see _ReLUFn
        return F.avg_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is None:
            return None
        # Each input pixel gets a quarter of its window's gradient (exactly, in binary floating
        # point); the row and column an odd size drops get none.
        g = F.interpolate(grad, scale_factor=2, mode="nearest") * 0.25
        return F.pad(g, (0, ctx.size[1] - g.shape[-1], 0, ctx.size[0] - g.shape[-2]))


class AvgPool2(nn.AvgPool2d):
    """`nn.AvgPool2d(2)` for D, with the cut double backward of `LeakyReLU`."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _penalty_forward:
            return super().forward(x)
        return _AvgPool2Fn.apply(x)


def to_torch_layers(module: nn.Module) -> nn.Module:
    """Swap this module's D layers for PyTorch's own, in place (same parameters and outputs):
    the textbook baseline for benchmarks, and the reference in tests."""
    torch_layer = {
        Conv2d: nn.Conv2d, Linear: nn.Linear, LeakyReLU: nn.LeakyReLU, ReLU: nn.ReLU, AvgPool2: nn.AvgPool2d
    }  # fmt: skip
    for m in module.modules():
        if nn.utils.parametrize.is_parametrized(m) and isinstance(m, tuple(torch_layer)):
            # Its class is a generated subclass (with the parametrization's properties): a swap
            # would silently keep ours.
            raise ValueError(f"to_torch_layers: {type(m).__name__} is parametrized (spectral norm?)")
        m.__class__ = torch_layer.get(type(m), type(m))
    return module


class MinibatchStd(nn.Module):
    """Appends the mean standard deviation over a group of samples as one more feature
    (Karras et al. 2018), so D can see a batch's lack of variety, the signature of collapse.

    Groups are *consecutive* samples: D's fused forward stacks reals then fakes, so with a
    batch size divisible by `group` no group mixes the two (StyleGAN's strided grouping would).
    """

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        g = self.group if n % self.group == 0 else 1  # a ragged batch: per-sample (std 0)
        y = x.reshape(n // g, g, *x.shape[1:]).float()
        std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt()  # per group and feature
        feat = std.flatten(1).mean(1).to(x.dtype)  # one number per group
        feat = feat.repeat_interleave(g).reshape(n, *([1] * (x.dim() - 1)))
        return torch.cat([x, feat.expand(n, 1, *x.shape[2:])], dim=1)


def spectral_norm_all(module: nn.Module) -> nn.Module:
    """Spectral normalization (Miyato et al. 2018) on every Linear and conv layer of `module`."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.utils.parametrizations.spectral_norm(m)
    return module
