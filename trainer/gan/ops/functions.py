"""The autograd Functions behind `trainer.gan.ops`, and the one state object they read.

Each is a layer's forward whose backward is cheaper to differentiate again (a gradient
penalty's double backward) or can record what the fused R1 / R2 step reuses. The module
wrappers that call them, and the switch, are in `trainer/gan/ops/__init__.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class OpsState:
    """What the contexts below switch on. One process-wide object, not thread-local: on a GPU
    the backward runs on the autograd engine's device thread, and a penalty's `autograd.grad`
    is synchronous."""

    penalty_forward: bool = False  # D's fast layers record their forward with these Functions
    no_weight_gradients: bool = False  # conv / linear backward: input gradient only
    records: list[dict] | None = None  # see `record_outputs`


STATE = OpsState()


@contextlib.contextmanager
def _switch(name: str, value: object) -> Iterator[None]:
    saved = getattr(STATE, name)
    setattr(STATE, name, value)
    try:
        yield
    finally:
        setattr(STATE, name, saved)


def penalty_forward() -> contextlib.AbstractContextManager[None]:
    """Inside, D's fast layers (`ops.apply`) record their forward with these Functions, whose
    graph a penalty differentiates twice more cheaply. Outside they run PyTorch's own ops: the
    same values and first-order gradients with less Python per call, which counts where a step
    is launch-bound. `penalties.penalty_logits` enters it, for the penalties' own forwards and
    for the D step's forward that R1 / R2 share with the loss."""
    return _switch("penalty_forward", True)


def no_weight_gradients() -> contextlib.AbstractContextManager[None]:
    """Inside, the conv / linear backward skips weight and bias gradients: for a penalty's inner
    `autograd.grad(D(x), x, create_graph=True)`. The engine skips them for built-in ops, but a
    custom Function cannot know that only the input's gradient is asked for."""
    return _switch("no_weight_gradients", True)


@contextlib.contextmanager
def record_outputs(enabled: bool = True) -> Iterator[list[dict]]:
    """Inside, and under `penalty_forward()`, D's fast conv and linear layers record each output
    (`"out"`) in the list this yields; a penalty's inner `autograd.grad` then adds the gradient
    of sum(logits) at that output (`"delta"`), and their first-order backward computes weight
    and bias gradients only.

    For the fused R1 / R2 step (`penalties.loss_from_deltas`): when D scores each sample on its
    own, the loss's gradient at a layer's output is the penalty's `delta` times the loss's
    derivative in that sample's logit, so the weight gradients need no backward pass of their
    own. Yields an empty list that nothing fills when not `enabled`.
    """
    records: list[dict] = []
    with _switch("records", records if enabled else None):
        yield records


def new_slot() -> dict | None:
    """A record for the next output, when `record_outputs` is on."""
    return {} if STATE.records is not None else None


def record(out: torch.Tensor, slot: dict | None) -> torch.Tensor:
    if slot is not None:
        slot["out"] = out
        STATE.records.append(slot)
    return out


class _Conv2dFn(torch.autograd.Function):
    """conv2d whose input gradient is taken by `conv_transpose2d`, itself differentiable.

    A gradient penalty differentiates D's input gradient once more. PyTorch's built-in double
    backward of a convolution gets the weight term from a convolution over the batch with the
    output gradient as its (large) kernel, which cuDNN runs with a slow generic kernel. Here
    that term is the weight gradient of a transposed convolution: an ordinary wgrad.
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
        want_w = not STATE.no_weight_gradients and ctx.needs_input_grad[1]
        want_b = not STATE.no_weight_gradients and ctx.has_bias and ctx.needs_input_grad[2]
        if not torch.is_grad_enabled():
            # A first-order backward (grad mode is on only under create_graph): nn.Conv2d's
            # own call, which computes both gradients in one pass (cheaper than a
            # conv_transpose2d plus a weight gradient). A recorded output's
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
        want_w = not STATE.no_weight_gradients and ctx.needs_input_grad[1]
        want_b = not STATE.no_weight_gradients and ctx.has_bias and ctx.needs_input_grad[2]
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = grad @ weight if want_x else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if want_w else None
        gb = g2.sum(0) if want_b else None
        return gx, gw, gb, None


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


class GradientAt(torch.autograd.Function):
    """Zero in value; its backward hands `grad` (times the incoming scale) to `x`: how
    `penalties.loss_from_deltas` feeds a recorded layer output its share of the loss's gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return torch.zeros((), device=x.device)

    @staticmethod
    def backward(ctx, scale: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None
