"""One GAN iteration as phases: D main (+ penalty on its interval), then G main.

Lazy regularization is data: the penalty runs every `interval` D steps with its weight
multiplied by the interval, and D's Adam lr/betas are rescaled by c = k / (k + 1)
(StyleGAN2's correction), so the regularized schedule follows the unregularized one.
"""

from __future__ import annotations

import torch

from trainer import losses, penalties
from trainer.config import Config
from trainer.engines import Engine, set_optimizer_hparams


class GANStep:
    """Runs the D and G phases on two engines; returns detached metric tensors (no sync)."""

    def __init__(self, G: Engine, D: Engine, cfg: Config, noise: torch.Generator):
        self.G, self.D, self.cfg = G, D, cfg
        self.noise = noise
        self.d_loss, self.g_loss = losses.get(cfg.loss.kind)
        k = cfg.penalty.interval if cfg.penalty.kind != "none" else 1
        self.reg_interval = k  # D_reg runs on every k-th D step (D_main every step, G_main after d_steps)
        self.d_iters = 0
        if k > 1:
            c = k / (k + 1)
            o = cfg.optim
            set_optimizer_hparams(D, o.d_lr * c, (o.beta1**c, o.beta2**c))

    def latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.latent_dim, generator=self.noise).to(self.G.device)

    def d_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """D main phase, fused with the penalty when it is due."""
        pen_cfg = self.cfg.penalty
        reg_due = pen_cfg.kind != "none" and self.d_iters % self.reg_interval == 0
        self.d_iters += 1
        with torch.no_grad():
            fake = self.G(self.latent(real.shape[0]))
        real = real.to(self.D.device)
        # Under fp16 the penalty gets its own fp32 forward; otherwise R1 reuses the main one.
        fp16 = self.cfg.parallel.precision == "fp16"
        if reg_due and pen_cfg.kind == "r1" and not fp16:
            real.requires_grad_(True)
        # One forward for real and fake: D has no batch statistics, so this equals two forwards,
        # and R1 differentiates the real rows of this same graph.
        logits = self.D(torch.cat([real, fake.to(real.dtype)]))
        real_logits, fake_logits = logits.split(real.shape[0])
        adversarial = self.d_loss(real_logits, fake_logits)
        loss = adversarial
        penalty = torch.zeros(())
        if reg_due:
            d_fn = self.D.fp32_forward if fp16 else self.D
            if pen_cfg.kind == "r1":
                penalty = penalties.r1(d_fn, real) if fp16 else penalties.r1_from_logits(real_logits, real)
                gain = pen_cfg.weight / 2
            else:
                penalty = penalties.wgan_gp(d_fn, real, fake, generator=self.noise)
                gain = pen_cfg.weight
            loss = loss + gain * self.reg_interval * penalty
        self.D.backward(loss)
        grad_norm = self.D.step()
        return {
            "d_loss": adversarial.detach(),  # the penalty is its own metric
            "penalty": penalty.detach(),
            "d_real": real_logits.detach().mean(),
            "d_fake": fake_logits.detach().mean(),
            "d_acc_real": (real_logits.detach() > 0).float().mean(),
            "d_acc_fake": (fake_logits.detach() < 0).float().mean(),
            "d_grad_norm": grad_norm,
        }

    def g_step(self, batch_size: int) -> dict[str, torch.Tensor]:
        """G main phase: D is frozen so no gradient lands in D, and D's engine is not touched."""
        self.D.requires_grad_(False)
        try:
            fake = self.G(self.latent(batch_size))
            loss = self.g_loss(self.D(fake))
            self.G.backward(loss)
            grad_norm = self.G.step()
        finally:
            self.D.requires_grad_(True)
        return {"g_loss": loss.detach(), "g_grad_norm": grad_norm}
