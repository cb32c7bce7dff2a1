"""One GAN iteration as phases: D main (+ penalty on its interval), then G main.

Lazy regularization is data: the penalty runs every `interval` D steps with its weight
multiplied by the interval, and D's Adam lr/betas are rescaled by c = k / (k + 1)
(StyleGAN2's correction), so the regularized schedule follows the unregularized one.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Protocol

import torch
from torch import nn

from trainer.config import Config
from trainer.gan import losses, ops, penalties
from trainer.gan.augment import Augment
from trainer.gan.models import MLPDiscriminator

log = logging.getLogger("stablegan.step")
R_PENALTIES = ("r1", "r2", "r1r2")  # zero-centred gradient penalties: gamma / 2 * E|grad|^2


class Network(Protocol):
    """What the step needs of a network and its optimizer (`trainer.train.engines.Engine`)."""

    module: nn.Module
    device: torch.device
    dtype: torch.dtype

    def __call__(
        self, x: torch.Tensor, eager: bool = False, y: torch.Tensor | None = None
    ) -> torch.Tensor: ...
    def eager(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...
    def fp32_forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> torch.Tensor: ...
    def set_hparams(self, lr: float, betas: tuple[float, float]) -> None: ...
    def requires_grad_(self, flag: bool) -> None: ...


def _on(device: torch.device, *values: torch.Tensor) -> torch.Tensor:
    """Scalars stacked on one device (a grad norm DeepSpeed reports may live on the CPU)."""
    return torch.stack([v.detach().float().to(device) for v in values])


class GANStep:
    """Runs the D and G phases on two engines; returns detached metric tensors (no sync)."""

    def __init__(self, G: Network, D: Network, cfg: Config, noise: torch.Generator):
        self.G, self.D, self.cfg = G, D, cfg
        self.noise = noise
        self.d_loss, self.g_loss = losses.get(cfg.loss.kind)
        self.g_term = losses.G_TERMS[cfg.loss.kind]
        self.d_iters = 0  # D steps so far: step x d_steps (the lazy schedule's phase)
        self.share_backward = self._apply_fast_ops(cfg.penalty.fast_ops)
        self._scores_per_sample: bool | None = None
        self.lr_scale, self.beta2, self.penalty_scale = 1.0, cfg.optim.beta2, 1.0
        self.set_penalty(cfg.penalty.kind, self.gamma(cfg))
        # What D sees, in both phases (augment.kind); ADA starts at augment.p and moves by
        # `adapt`. It draws from the latents' generator, which checkpoints hold: a resumed run
        # augments exactly as an unbroken one (and at p = 0 draws nothing).
        a = cfg.augment
        self.augment = Augment(a.transforms(), 0.0 if a.kind == "none" else a.p, noise)
        # A conditional pair (model.conditional): D's calls carry this phase's labels `_y`.
        self.num_classes = cfg.model.num_classes if cfg.model.conditional else 0
        self._y: torch.Tensor | None = None

    @staticmethod
    def gamma(cfg: Config) -> float:
        """The configured penalty weight as a number (`penalty.weight=auto` resolved from the
        resolution and the global batch; 2-D points count as resolution 1)."""
        res = cfg.model.resolution if cfg.model.arch != "mlp" else 1
        return cfg.penalty.gamma(res, cfg.data.batch_size * cfg.trainer.num_workers)

    def _apply_fast_ops(self, mode: str) -> bool:
        """`penalty.fast_ops`, the one switch: D's layers get the cheaper double backward
        (trainer.gan.ops), applied after the engine is built. on: every layer; off: PyTorch's
        own; auto: every layer of an image D, the 2-D MLP's activations only (its presets were
        tuned and are reported with PyTorch's Linear). Returns whether the fused R1 / R2 step may
        take the loss's gradient from the penalty's pass (`penalties.loss_from_deltas`, which
        needs recording Linear layers too); `_can_share_backward` still checks D on each step."""
        if mode == "off":
            return False
        d = getattr(self.D.module, "inner", self.D.module)  # a packed D's own network
        linear = mode == "on" or not isinstance(d, MLPDiscriminator)
        ops.apply(self.D.module, linear=linear)
        return linear

    def set_penalty(self, kind: str, weight: float) -> None:
        """Apply the penalty the caller owns (the config's, or the stability guard's once it
        raises or adds one); the interval is kept. `cfg` stays the config as given."""
        self.penalty = replace(self.cfg.penalty, kind=kind, weight=weight)
        k = self.penalty.interval if kind != "none" else 1
        self.reg_interval = k  # D_reg runs on every k-th D step (D_main every step, G_main after d_steps)
        self.set_hparams(self.lr_scale, self.beta2, self.penalty_scale)

    def set_hparams(self, lr_scale: float, beta2: float, penalty_scale: float = 1.0) -> None:
        """Both learning rates times `lr_scale` (schedule x guard), Adam's beta2, the penalty
        weight times `penalty_scale` (its schedule); D's lazy-regularization correction kept:
        lr x c, betas ** c with c = k / (k + 1) for a penalty every k-th step."""
        o, k = self.cfg.optim, self.reg_interval
        c = k / (k + 1) if k > 1 else 1.0
        self.lr_scale, self.beta2, self.penalty_scale = lr_scale, beta2, penalty_scale
        self.D.set_hparams(o.d_lr * c * lr_scale, (o.beta1**c, beta2**c))
        self.G.set_hparams(o.g_lr * lr_scale, (o.beta1, beta2))

    def set_lr_scale(self, scale: float) -> None:
        """Both learning rates times `scale`, beta2 and the penalty's schedule kept."""
        self.set_hparams(scale, self.beta2, self.penalty_scale)

    def adapt(self, r_t: float, images: int) -> float:
        """ADA (augment.kind=ada): move p by D's overfitting signal `r_t` measured over
        `images` images; every rank passes the same reduced values, so p stays equal."""
        a = self.cfg.augment
        if a.kind == "ada":
            self.augment.adjust(r_t, a.ada_target, images, a.ada_speed)
        return self.augment.p

    def latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.latent_dim, generator=self.noise).to(self.G.device)

    def labels(self, n: int, given: torch.Tensor | None = None) -> torch.Tensor | None:
        """A conditional phase's labels: `given` (the reals'), or uniform draws; None when
        unconditional."""
        if not self.num_classes:
            return None
        if given is None:
            return torch.randint(self.num_classes, (n,), generator=self.noise).to(self.G.device)
        if given.min() < 0 or given.max() >= self.num_classes:
            raise ValueError(
                f"model.conditional=true but a batch has labels outside 0..{self.num_classes - 1} "
                f"({given.min().item()}..{given.max().item()}; -1 is a sample without a label): "
                "make the shards from a labelled source, or set model.conditional=false"
            )
        return given.to(self.G.device)

    def _d(self, x: torch.Tensor, eager: bool = False, fp32: bool = False) -> torch.Tensor:
        """D's logits at `x` with this phase's labels (repeated for a stack of reals and fakes)."""
        y = None if self._y is None else self._y.repeat(len(x) // len(self._y))
        return self.D.fp32_forward(x, y) if fp32 else self.D(x, eager=eager, y=y)

    def _d_eager(self, x: torch.Tensor) -> torch.Tensor:
        return self._d(x, eager=True)

    def _d_fp32(self, x: torch.Tensor) -> torch.Tensor:
        return self._d(x, fp32=True)

    @torch.no_grad()
    def _real_logits(self, real: torch.Tensor) -> torch.Tensor:
        """D's logits of (augmented) reals, for a paired G loss: a constant to G."""
        return self._d(self.augment(real.to(self.D.device)))

    def d_step(self, real: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """D main phase, fused with the penalty when it is due; a conditional pair's fakes take
        the reals' `labels`, so every D call (and WGAN-GP's interpolates) has one class per row."""
        kind = self.penalty.kind
        reg_due = kind != "none" and self.d_iters % self.reg_interval == 0
        self.d_iters += 1
        self._y = self.labels(len(real), labels)
        with torch.no_grad():
            fake = self.G(self.latent(real.shape[0]), y=self._y)
        real, fake = real.to(self.D.device), fake.to(real.dtype)
        # The penalties see what D sees: R1 is taken at the augmented reals.
        real, fake = self.augment(real), self.augment(fake)
        # Under fp16 the penalty gets its own fp32 forward; otherwise R1 / R2 reuse the main one.
        fp16 = self.cfg.parallel.precision == "fp16"
        fused = reg_due and kind in ("r1", "r2", "r1r2") and not fp16
        real_logits, fake_logits, records = self._d_logits(real, fake, kind if fused else "")
        penalty = torch.zeros((), device=real_logits.device)
        if reg_due:
            penalty = self._penalty(kind, real, fake, real_logits, fake_logits, fused, fp16)
        if records:  # the penalized half's backward comes from the penalty's input gradient
            half = "real" if kind == "r1" else "fake"
            adversarial = penalties.loss_from_deltas(self.d_loss, real_logits, fake_logits, half, records)
        else:
            adversarial = self.d_loss(real_logits, fake_logits)
        loss = adversarial
        if reg_due:
            gain = self.penalty.weight * self.penalty_scale / (2 if kind in R_PENALTIES else 1)
            loss = loss + gain * self.reg_interval * penalty
        self.D.backward(loss)
        for r in records:
            # Each record holds its layer's output, whose autograd node holds the record: a
            # cycle through C++ that Python's collector cannot see. Unbroken, it keeps every
            # layer's output and delta alive, a step's worth of activations leaked per step.
            r.clear()
        grad_norm = self.D.step()
        stats = _on(adversarial.device, adversarial, grad_norm, penalty)
        return {
            "d_loss": adversarial.detach(),  # the penalty is its own metric
            "penalty": penalty.detach(),
            "d_real": real_logits.detach().mean(),
            "d_fake": fake_logits.detach().mean(),
            "d_acc_real": (real_logits.detach() > 0).float().mean(),
            "d_acc_fake": (fake_logits.detach() < 0).float().mean(),
            "d_sign_real": real_logits.detach().sign().mean(),  # ADA's r_t: 1 when D overfits
            "d_grad_norm": grad_norm,
            "nonfinite": (~torch.isfinite(stats)).sum().float(),  # summed over steps by the loop
        }

    def _d_logits(self, real: torch.Tensor, fake: torch.Tensor, fused: str) -> tuple:
        """(real logits, fake logits, recorded outputs) of D's main forward; `fused` ("r1",
        "r2" or "") names the penalty that takes its input gradient from this forward."""
        if not fused:
            # No per-sample penalty graph: one forward of real and fake together (D has no
            # batch statistics; minibatch-stddev groups and packs never straddle the halves).
            return (*self._d(torch.cat([real, fake])).chunk(2), [])
        # R1 / R2 take their input gradient from the adversarial forward of the reals /
        # fakes: one forward fewer than a separate penalty pass. Real and fake go through
        # D separately here, so the double backward spans only the penalized half (a
        # forward of the concatenation made the penalty step slower than the textbook one).
        # R1 + R2 penalize both halves: the loss takes the plain backward (the shared one
        # covers one half).
        share = fused != "r1r2" and self._can_share_backward(real)
        on_real, on_fake = fused in ("r1", "r1r2"), fused in ("r2", "r1r2")
        for x, on in ((real, on_real), (fake, on_fake)):
            if on:
                x.requires_grad_(True)
        with ops.record_outputs(share) as records:
            real_logits = self._d_forward(real, penalized=on_real)
            fake_logits = self._d_forward(fake, penalized=on_fake)
        return real_logits, fake_logits, records

    def _can_share_backward(self, real: torch.Tensor) -> bool:
        """Whether this D step may use `penalties.loss_from_deltas`: every weight in a recording
        layer (checked each time: a D's layers can be swapped back) and each sample scored on
        its own (checked once, by behaviour). Otherwise the plain backward, with a warning."""
        if not self.share_backward:
            return False
        uncovered = ops.covers_every_weight(self.D.module)
        why = (
            f"parameters outside the fast conv/linear layers: {', '.join(uncovered[:4])}" if uncovered else ""
        )
        if not why and self._scores_per_sample is None:
            self._scores_per_sample = ops.scores_per_sample(self.D.eager, self.D.module, real)
            if not self._scores_per_sample:
                why = "D's score of a sample depends on other samples (minibatch stddev, batch statistics)"
        if why:
            log.warning("fused R1/R2 step: the plain backward instead of the shared one: %s", why)
            self.share_backward = False
        return not why

    def _d_forward(self, x: torch.Tensor, penalized: bool) -> torch.Tensor:
        """D's logits; a forward that a penalty differentiates twice runs eagerly (a compiled
        graph has no double backward) with D's layers recording it for that."""
        return penalties.penalty_logits(self._d_eager, x) if penalized else self._d(x)

    def _penalty(self, kind, real, fake, real_logits, fake_logits, fused: bool, fp16: bool) -> torch.Tensor:
        d_fn = self._d_fp32 if fp16 else self._d_eager
        if kind in R_PENALTIES:  # fused: from the main forward's logits; else a forward of its own
            terms = []
            if kind != "r2":
                terms.append(
                    penalties.r1_from_logits(real_logits, real) if fused else penalties.r1(d_fn, real)
                )
            if kind != "r1":
                terms.append(
                    penalties.r2_from_logits(fake_logits, fake) if fused else penalties.r2(d_fn, fake)
                )
            return sum(terms[1:], terms[0])
        if kind == "dragan":
            return penalties.dragan(d_fn, real, generator=self.noise)
        return penalties.wgan_gp(d_fn, real, fake, generator=self.noise)

    def g_step(
        self, batch_size: int, real: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """G main phase: D is frozen so no gradient lands in D, and D's engine is not touched.
        A paired loss (`losses.PAIRED`, RpGAN) also has D score `real`, a real batch of
        `batch_size` (the fakes then take its `labels`); the other losses ignore it."""
        paired = self.cfg.loss.kind in losses.PAIRED
        if paired and real is None:
            raise ValueError(f"loss={self.cfg.loss.kind} pairs fakes with reals: pass g_step a real batch")
        self.D.requires_grad_(False)
        try:
            z = self.latent(batch_size)
            self._y = self.labels(batch_size, labels if paired else None)
            real_logits = self._real_logits(real) if paired else None
            logits = self._d(self.augment(self.G(z, y=self._y)))
            if getattr(self.G.module, "prior_logits", None) is None:
                loss = self.g_loss(logits, real_logits)
            else:  # an experts G with a learned prior (model.g_expert_prior=learned)
                # z in G's dtype, as its forward sees it: the same expert for each sample.
                log_prior = self.G.module.log_prior(z.to(self.G.dtype))
                loss = losses.with_learned_prior(self.g_term, logits, log_prior, real_logits)
            self.G.backward(loss)
            grad_norm = self.G.step()
        finally:
            self.D.requires_grad_(True)
        stats = _on(loss.device, loss, grad_norm)
        return {
            "g_loss": loss.detach(),
            "g_grad_norm": grad_norm,
            "nonfinite": (~torch.isfinite(stats)).sum().float(),
        }
