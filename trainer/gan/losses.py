"""Adversarial losses as pure functions of D's logits (no engines, no models).

`d_loss(real, fake)` is what D minimises, `g_loss(fake)` what G minimises. The generator loss
is the non-saturating one by default: the seed article's `generator_loss` used zeros as targets,
i.e. G minimised log(1 - D(G(z)))'s complement wrongly and learned to look *fake*.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# G's loss per sample: each `*_g` below is the mean of its term (`with_learned_prior` needs the terms).
G_TERMS: dict[str, Callable[[Tensor], Tensor]] = {
    "nonsaturating": lambda fake: F.softplus(-fake),
    "hinge": torch.neg,
    "wasserstein": torch.neg,
    "lsgan": lambda fake: 0.5 * (fake - 1.0).square(),
}


def nonsaturating_d(real: Tensor, fake: Tensor) -> Tensor:
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), in a stable softplus form."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def nonsaturating_g(fake: Tensor) -> Tensor:
    """-log sigmoid(D(G(z))): strong gradients exactly when D rejects the fakes."""
    return G_TERMS["nonsaturating"](fake).mean()


def hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g(fake: Tensor) -> Tensor:
    return G_TERMS["hinge"](fake).mean()


def wasserstein_d(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def wasserstein_g(fake: Tensor) -> Tensor:
    return G_TERMS["wasserstein"](fake).mean()


def lsgan_d(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * ((real - 1.0).square().mean() + fake.square().mean())


def lsgan_g(fake: Tensor) -> Tensor:
    return G_TERMS["lsgan"](fake).mean()


LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "nonsaturating": (nonsaturating_d, nonsaturating_g),
    "hinge": (hinge_d, hinge_g),
    "wasserstein": (wasserstein_d, wasserstein_g),
    "lsgan": (lsgan_d, lsgan_g),
}


def with_learned_prior(g_term: Callable[[Tensor], Tensor], fake: Tensor, log_prior: Tensor) -> Tensor:
    """G's loss, the mean of `g_term(fake)`, plus the score-function gradient of its expectation
    in a learned prior over G's experts (`log_prior`: each sample's log p(expert),
    differentiable in the prior).

    Picking an expert is discrete, so the prior gets REINFORCE's estimate: each sample's loss,
    minus the batch mean as a baseline, times the gradient of its log p(expert). The added term
    is zero in value; experts whose samples D scores better than average gain mass.
    """
    per_sample = g_term(fake)
    loss = per_sample.mean()
    return loss + ((per_sample - loss).detach() * (log_prior - log_prior.detach())).mean()


def get(kind: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(d_loss, g_loss) for a loss name."""
    try:
        return LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss {kind!r}; allowed: {', '.join(LOSSES)}") from None
