"""Gradient penalties on D, safe for double backward under DeepSpeed.

Each takes `d_fn`, the discriminator's *module* forward: going through the DeepSpeed engine's
`__call__` makes `autograd.grad(..., create_graph=True)` fail under ZeRO 0-2 (its hooks fire).
The inner gradient comes back in at least fp32 whatever D's dtype. `scale` multiplies the inner
gradient's seed and is divided back out; the trainer leaves it at 1: under fp16, scaling by
the loss scale overflows, so there the penalty runs through an fp32 forward instead
(`Engine.fp32_forward`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.gan.ops import GradientAt, no_weight_gradients, penalty_forward

Tensor = torch.Tensor
DFn = Callable[[Tensor], Tensor]


def input_grad(logits: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
    """d sum(logits) / dx with the graph kept (for the penalty's own backward), in >= fp32."""
    with no_weight_gradients():  # D's convs skip the weight gradients nobody asked for
        (grad,) = torch.autograd.grad(logits.sum() * scale, x, create_graph=True)
    return grad.to(torch.promote_types(grad.dtype, torch.float32)) / scale


def penalty_logits(d_fn: DFn, x: Tensor) -> Tensor:
    """D's logits at `x` for a penalty of their own: recorded by D's layers for a cheap double
    backward (`ops.penalty_forward`)."""
    with penalty_forward():
        return d_fn(x)


def r1_from_logits(real_logits: Tensor, real: Tensor, scale: float = 1.0) -> Tensor:
    """E ||grad_x D(x)||^2 on reals, reusing the forward that produced `real_logits`.

    `real` must have had `requires_grad_(True)` before the forward: the D step fuses the
    adversarial forward and the penalty forward into one this way. Run that forward through
    `penalty_logits` for D's cheaper double backward.
    """
    return input_grad(real_logits, real, scale).square().flatten(1).sum(1).mean()


def loss_from_deltas(
    d_loss: Callable[[Tensor, Tensor], Tensor],
    real_logits: Tensor,
    fake_logits: Tensor,
    penalized: str,
    records: list[dict],
    scale: float = 1.0,
) -> Tensor:
    """`d_loss(real_logits, fake_logits)`, the same value and the same gradient in D's weights,
    with the `penalized` half's ("real" or "fake") backward through D's layers taken from the
    deltas that the penalty's input gradient (seed `scale`) recorded (`ops.record_outputs`).

    D scores each sample on its own, so the loss's gradient at a recorded output is the delta
    times dloss/dlogit of that sample; the recorded layers turn it into weight gradients alone.
    That saves the fused R1 / R2 step one backward pass over the penalized half: the activation
    gradients the loss's backward would compute, the penalty's input gradient computed already.
    """
    if not records or any("delta" not in r for r in records):
        raise RuntimeError("loss_from_deltas: run the penalty's input_grad inside record_outputs first")
    probe = (real_logits if penalized == "real" else fake_logits).detach().requires_grad_(True)
    loss = d_loss(probe, fake_logits) if penalized == "real" else d_loss(real_logits, probe)
    (per_logit,) = torch.autograd.grad(loss, probe, retain_graph=True)
    for r in records:
        c = (per_logit / scale).to(r["delta"].dtype).reshape(-1, *[1] * (r["delta"].dim() - 1))
        loss = loss + GradientAt.apply(r["out"], c * r["delta"])
    return loss


def r1(d_fn: DFn, real: Tensor, scale: float = 1.0) -> Tensor:
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 over real samples."""
    x = real.detach().requires_grad_(True)
    return r1_from_logits(penalty_logits(d_fn, x), x, scale)


def r2_from_logits(fake_logits: Tensor, fake: Tensor, scale: float = 1.0) -> Tensor:
    """R2 on fakes, reusing the fused forward (`fake` needs `requires_grad_` before it)."""
    return input_grad(fake_logits, fake, scale).square().flatten(1).sum(1).mean()


def r2(d_fn: DFn, fake: Tensor, scale: float = 1.0) -> Tensor:
    """R2 (Mescheder et al. 2018): E ||grad_x D(x)||^2 over generated samples."""
    x = fake.detach().requires_grad_(True)
    return r2_from_logits(penalty_logits(d_fn, x), x, scale)


def dragan(
    d_fn: DFn, real: Tensor, scale: float = 1.0, generator: torch.Generator | None = None, c: float = 0.5
) -> Tensor:
    """DRAGAN (Kodali et al. 2017): E (||grad D(x_hat)|| - 1)^2 around the reals, where
    x_hat = x + t * c * std(x) * u with u ~ U[0, 1) per element and t ~ U[0, 1) per sample."""
    x = real.detach()
    # A full-size draw made on x's device (a host draw would be copied over every step), from a
    # generator seeded by the caller's CPU one so that runs still replay exactly.
    seed = int(torch.randint(2**62, (), generator=generator))
    u = torch.rand(
        x.shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device, dtype=x.dtype
    )
    perturbed = x + c * x.float().std().to(x.dtype) * u
    x_hat = interpolate(perturbed, x, generator)  # t * perturbed + (1 - t) * x
    grad = input_grad(penalty_logits(d_fn, x_hat), x_hat, scale)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).square().mean()


def interpolate(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random points on the lines between real and fake samples (one t per sample)."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    # Drawn on the CPU generator that also draws the latents, so runs replay exactly.
    t = torch.rand(shape, generator=generator).to(real.device, real.dtype)
    return (t * real.detach() + (1 - t) * fake.detach()).requires_grad_(True)


def wgan_gp(
    d_fn: DFn, real: Tensor, fake: Tensor, scale: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E (||grad D(x_hat)|| - 1)^2 on interpolates."""
    x = interpolate(real, fake, generator)
    grad = input_grad(penalty_logits(d_fn, x), x, scale)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).square().mean()
