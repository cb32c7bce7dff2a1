"""Adversarial losses as pure functions of D's logits (no engines, no models).

`d_loss(real, fake)` is what D minimises, `g_loss(fake, real)` what G minimises (`real`, D's
logits of a real batch, only matters to the paired losses in `PAIRED`). The generator loss
is the non-saturating one by default: the seed article's `generator_loss` used zeros as targets,
i.e. G minimised log(1 - D(G(z)))'s complement wrongly and learned to look *fake*.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


GTerm = Callable[[Tensor, "Tensor | None"], Tensor]
# G's loss per sample: each `*_g` below is the mean of its term (`with_learned_prior` needs the
# terms). A term takes the fakes' logits and the paired reals' (None for the unpaired losses).
G_TERMS: dict[str, GTerm] = {
    "nonsaturating": lambda fake, real=None: F.softplus(-fake),
    "hinge": lambda fake, real=None: -fake,
    "wasserstein": lambda fake, real=None: -fake,
    "lsgan": lambda fake, real=None: 0.5 * (fake - 1.0).square(),
    # RpGAN: softplus(-(D(fake) - D(real))), fake i paired with real i
    "relativistic": lambda fake, real: F.softplus(real - fake),
}
# Losses whose G side needs D's logits of a real batch (the G step runs D on the reals too).
PAIRED = frozenset({"relativistic"})


def nonsaturating_d(real: Tensor, fake: Tensor) -> Tensor:
    """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), in a stable softplus form."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def nonsaturating_g(fake: Tensor, real: Tensor | None = None) -> Tensor:
    """-log sigmoid(D(G(z))): strong gradients exactly when D rejects the fakes."""
    return G_TERMS["nonsaturating"](fake).mean()


def hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return G_TERMS["hinge"](fake).mean()


def wasserstein_d(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def wasserstein_g(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return G_TERMS["wasserstein"](fake).mean()


def lsgan_d(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * ((real - 1.0).square().mean() + fake.square().mean())


def lsgan_g(fake: Tensor, real: Tensor | None = None) -> Tensor:
    return G_TERMS["lsgan"](fake).mean()


def relativistic_d(real: Tensor, fake: Tensor) -> Tensor:
    """RpGAN's D side: softplus(-(D(real) - D(fake))), real i paired with fake i (Jolicoeur-
    Martineau 2019; with R1 and R2 it is R3GAN's loss, Huang et al. 2024)."""
    return F.softplus(fake - real).mean()


def relativistic_g(fake: Tensor, real: Tensor | None = None) -> Tensor:
    if real is None:
        raise ValueError("loss=relativistic pairs each fake with a real: pass D's logits of a real batch")
    return G_TERMS["relativistic"](fake, real.detach()).mean()


LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[..., Tensor]]] = {
    "nonsaturating": (nonsaturating_d, nonsaturating_g),
    "hinge": (hinge_d, hinge_g),
    "wasserstein": (wasserstein_d, wasserstein_g),
    "lsgan": (lsgan_d, lsgan_g),
    "relativistic": (relativistic_d, relativistic_g),
}


def with_learned_prior(g_term: GTerm, fake: Tensor, log_prior: Tensor, real: Tensor | None = None) -> Tensor:
    """G's loss, the mean of `g_term(fake)`, plus the score-function gradient of its expectation
    in a learned prior over G's experts (`log_prior`: each sample's log p(expert),
    differentiable in the prior).

    Picking an expert is discrete, so the prior gets REINFORCE's estimate: each sample's loss,
    minus the batch mean as a baseline, times the gradient of its log p(expert). The added term
    is zero in value; experts whose samples D scores better than average gain mass.
    """
    per_sample = g_term(fake, real)
    loss = per_sample.mean()
    return loss + ((per_sample - loss).detach() * (log_prior - log_prior.detach())).mean()


def get(kind: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[..., Tensor]]:
    """(d_loss, g_loss) for a loss name."""
    try:
        return LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss {kind!r}; allowed: {', '.join(LOSSES)}") from None
