"""Plain-loop probe of 2-D GAN recipes, for choosing a preset before a full sweep.

The same MLP pair, loss, R1 and EMA as the trainer, in a bare PyTorch loop on one thread with
fresh mixture samples every step (no Ray, DeepSpeed or MLflow), printing PacGAN's metrics for
the raw and the EMA generator every `--every` steps, plus where the low-quality samples are:
`wide` (3-6 sigma from the nearest mode), `off` (beyond 6 sigma: bridges between modes) and
`spread` (the high-quality samples' std around their mode, in sigma; 1.0 = the data's).

    python experiments/gan2d_probe.py --data grid25 --r1 0.1 --lr 1e-2 --sched linear \
        --width 128 --steps 12000 --every 2000

`--experts K` makes G K small expert MLPs (the trainer's `model.g_experts`), `--learn-prior`
adds the learned prior over them (`model.g_expert_prior=learned`), and `--save` keeps the EMA G
and D for a closer look.

Numbers from it are probes; the preset's own numbers come from `mode_collapse.py`.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.sources import MIXTURES
from trainer.eval.metrics import mode_metrics
from trainer.gan import losses
from trainer.gan.ema import EMA
from trainer.gan.models.mlp import MLPDiscriminator, MLPExpertsGenerator, MLPGenerator, expert_index


class Scale(torch.nn.Module):
    """A fixed rescaling: the points normalised inside the models (--scale)."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class LatentMixture(torch.nn.Module):
    """A learned mixture-of-Gaussians latent (DeLiGAN, Gurumurthy et al. 2017) fed by N(0, I) (--mix).

    z[:, 0] picks one of K equally likely components through the normal CDF; the other
    coordinates are scaled and shifted by that component's learned std and mean, so G can
    map disconnected modes from disconnected latent regions.
    """

    def __init__(self, dim: int, components: int, init_std: float):
        super().__init__()
        self.k = components
        self.mean = torch.nn.Parameter(torch.randn(components, dim))
        self.log_std = torch.nn.Parameter(torch.full((components, dim), math.log(init_std)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = expert_index(z[:, 0], self.k)
        return self.mean[c] + self.log_std[c].exp() * z[:, 1:]


class OneHotCode(torch.nn.Module):
    """z[:, 0] picks one of K equally likely categories (normal CDF), fed one-hot beside z[:, 1:]
    (--onehot K): G can send each category to its own region without a continuous path."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = expert_index(z[:, 0], self.k)
        return torch.cat([F.one_hot(c, self.k).to(z.dtype), z[:, 1:]], 1)


def latent(n: int, zdim: int, prior: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) or U[-1, 1)^zdim latents."""
    if prior == "uniform":
        return torch.rand(n, zdim, generator=generator) * 2 - 1
    return torch.randn(n, zdim, generator=generator)


def sigmas_to_nearest_mode(pts: np.ndarray, modes: np.ndarray, sigma: float) -> np.ndarray:
    """Each point's distance to its nearest mode, in units of the modes' sigma."""
    return np.linalg.norm(pts[:, None] - modes[None], axis=2).min(1) / sigma


def metrics(
    g: torch.nn.Module, zdim: int, modes: np.ndarray, sigma: float, prior: str = "normal"
) -> dict[str, float]:
    """PacGAN's metrics on 2,500 samples of a fixed latent batch, and where the rest lie."""
    with torch.no_grad():
        pts = g(latent(2500, zdim, prior, torch.Generator().manual_seed(123))).numpy()
    m = mode_metrics(pts, modes, sigma)
    d = sigmas_to_nearest_mode(pts, modes, sigma)
    good = d < 3
    m["wide"] = float(((d >= 3) & (d < 6)).mean())
    m["off"] = float((d >= 6).mean())
    m["spread"] = float(np.sqrt((d[good] ** 2).mean() / 2)) if good.any() else 0.0
    return m


def prior_summary(g: torch.nn.Module) -> str:
    """A learned prior over experts, if any: its effective number of experts and extremes x K."""
    logits = getattr(g.net[0], "prior_logits", None)
    if logits is None:
        return ""
    p = torch.softmax(logits.detach(), 0)
    eff = float(torch.exp(-(p * p.log()).sum()))
    return f"  prior: {eff:.1f} effective, x K {len(p) * float(p.min()):.2f}..{len(p) * float(p.max()):.2f}"


def diagnose(g: torch.nn.Module, zdim: int, modes: np.ndarray, sigma: float, prior: str) -> None:
    """Where the low-quality samples come from in latent space (--diagnose).

    Bridges between modes are the images of the latent regions where G switches from one mode
    to the next: there ||dG/dz|| is large. Tails of the latent (large |z|) flung outside the
    data would instead show as off-mode mass growing with |z|.
    """
    z = latent(20000, zdim, prior, torch.Generator().manual_seed(7)).requires_grad_(True)
    out = g(z)
    jac = torch.stack([torch.autograd.grad(out[:, i].sum(), z, retain_graph=True)[0] for i in range(2)], 1)
    jn = torch.linalg.matrix_norm(jac).detach().numpy()
    d = sigmas_to_nearest_mode(out.detach().numpy(), modes, sigma)
    r = z.detach().norm(dim=1).numpy()
    off, good = d >= 6, d < 3
    print(
        f"||dG/dz|| median: high quality {np.median(jn[good]):.3g}, off (> 6 sigma) {np.median(jn[off]):.3g}"
    )
    edges = np.quantile(r, [0, 0.25, 0.5, 0.75, 0.95, 1])
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (r >= lo) & (r <= hi)
        print(
            f"|z| in [{lo:.2f}, {hi:.2f}]: {100 * off[m].mean():.1f} % off, {100 * (~good & ~off)[m].mean():.1f} % wide"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="grid25", choices=sorted(MIXTURES))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3, help="G lr (and D's unless --dlr)")
    p.add_argument("--dlr", type=float, default=None)
    p.add_argument("--sched", default="constant", choices=["constant", "linear"])
    p.add_argument(
        "--decay-from", type=float, default=0.0, help="linear: constant lr until this fraction, then decay"
    )
    p.add_argument("--floor", type=float, default=0.0, help="linear: decay to this fraction of the lr, not 0")
    p.add_argument("--r1", type=float, default=0.0, help="R1 gamma, every D step (0 = off)")
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--dsteps", type=int, default=1)
    p.add_argument("--zdim", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--dwidth", type=int, default=None, help="D's width (default: --width)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--topk", type=float, default=1.0, help="G trains on this top fraction of fakes")
    p.add_argument("--scale", type=float, default=1.0, help="G output x scale, D input / scale")
    p.add_argument("--zscale", type=float, default=1.0, help="G's input is zscale * z")
    p.add_argument("--prior", default="normal", choices=["normal", "uniform"], help="latent distribution")
    p.add_argument(
        "--mix", type=int, default=0, help="latent mixture components (0 = plain N(0, I)); z[:, 0] selects"
    )
    p.add_argument("--mix-std", type=float, default=1.0, help="the components' initial std")
    p.add_argument(
        "--onehot",
        type=int,
        default=0,
        help="a uniform categorical code of this many values, one-hot, beside z",
    )
    p.add_argument("--experts", type=int, default=0, help="K separate small MLP generators (0 = one MLP)")
    p.add_argument("--expert-width", type=int, default=32)
    p.add_argument(
        "--learn-prior", action="store_true", help="learn the prior over experts (score-function gradient)"
    )
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument(
        "--diagnose", action="store_true", help="at the end, locate the off-mode mass in latent space"
    )
    p.add_argument(
        "--save", default=None, help="write the EMA generator's state_dict here at the end (D's to PATH.D)"
    )
    a = p.parse_args()
    if not 0 <= a.decay_from < 1:
        p.error(f"--decay-from {a.decay_from}: a fraction of the run in [0, 1)")

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    modes_fn, sigma = MIXTURES[a.data]
    modes = modes_fn()
    centres = torch.tensor(modes, dtype=torch.float32)
    if (a.mix or a.onehot or a.experts) and a.zdim < 2:
        p.error("--mix / --onehot / --experts need --zdim >= 2 (one selector coordinate plus the rest)")
    if a.learn_prior and (not a.experts or a.topk < 1):
        p.error("--learn-prior needs --experts, and every sample's loss (no --topk)")
    if sum(map(bool, (a.mix, a.onehot, a.experts))) > 1:
        p.error("--mix, --onehot and --experts all use z[:, 0] as their selector: pick one")
    G = MLPGenerator(a.zdim - (1 if a.mix or a.onehot else 0) + a.onehot, a.width, a.depth)
    if a.experts:
        G.net = torch.nn.Sequential(
            MLPExpertsGenerator(a.zdim, a.experts, a.expert_width, a.depth, a.learn_prior)
        )
    D = MLPDiscriminator(a.dwidth or a.width, a.depth, 0)
    if a.onehot:
        G.net.insert(0, OneHotCode(a.onehot))
    if a.mix:
        G.net.insert(0, LatentMixture(a.zdim - 1, a.mix, a.mix_std))
    if a.zscale != 1:  # after the mixture, if any: scaling the selector would skew its choice
        G.net.insert(1 if a.mix else 0, Scale(a.zscale))
    if a.scale != 1:
        G.net.append(Scale(a.scale))
        D.net.insert(0, Scale(1 / a.scale))
    g_lr, d_lr = a.lr, a.dlr or a.lr
    og = torch.optim.Adam(G.parameters(), g_lr, betas=(a.beta1, a.beta2))
    od = torch.optim.Adam(D.parameters(), d_lr, betas=(a.beta1, a.beta2))
    ema = EMA(G, a.ema)
    t0 = time.time()
    for t in range(a.steps):
        f = a.decay_from
        scale = min(1.0, (1 - t / a.steps) / (1 - f)) if a.sched == "linear" else 1.0
        scale = a.floor + (1 - a.floor) * scale
        for opt, base in ((og, g_lr), (od, d_lr)):
            for group in opt.param_groups:
                group["lr"] = base * scale
        for _ in range(a.dsteps):
            real = centres[torch.randint(len(centres), (a.bs,))] + sigma * torch.randn(a.bs, 2)
            real.requires_grad_(a.r1 > 0)
            fake = G(latent(a.bs, a.zdim, a.prior)).detach()
            real_logits, fake_logits = D(real), D(fake)
            loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            if a.r1 > 0:
                (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
                loss = loss + a.r1 / 2 * grad.pow(2).sum(1).mean()
            od.zero_grad(set_to_none=True)
            loss.backward()
            od.step()
        zg = latent(a.bs, a.zdim, a.prior)
        g_logits = D(G(zg))
        if a.topk < 1:  # top-k (Sinha et al. 2020): k ramps from the batch to topk over half the run
            k = int(a.bs * max(a.topk, 1 - (1 - a.topk) * 2 * t / a.steps))
            g_logits = g_logits.topk(k).values
        if a.learn_prior:  # the trainer's score-function term for the prior's logits
            g_loss = losses.with_learned_prior(
                losses.G_TERMS["nonsaturating"], g_logits, G.net[0].log_prior(zg)
            )
        else:
            g_loss = losses.nonsaturating_g(g_logits)
        og.zero_grad(set_to_none=True)
        g_loss.backward()
        og.step()
        ema.update(G)
        if (t + 1) % a.every == 0:
            r, e = (
                metrics(G, a.zdim, modes, sigma, a.prior),
                metrics(ema.module, a.zdim, modes, sigma, a.prior),
            )
            print(
                f"step {t + 1}  raw {r['modes_covered']:.0f} modes / {100 * r['high_quality']:.1f} % HQ"
                f" / KL {r['reverse_kl']:.2f} / spread {r['spread']:.2f}  ema {e['modes_covered']:.0f} / {100 * e['high_quality']:.1f}"
                f" / {e['reverse_kl']:.2f}  wide {100 * e['wide']:.1f} %  off {100 * e['off']:.1f} %"
                f"  spread {e['spread']:.2f}{prior_summary(ema.module)}  {time.time() - t0:.0f}s",
                flush=True,
            )
    if a.diagnose:
        diagnose(ema.module, a.zdim, modes, sigma, a.prior)
    if a.save:
        torch.save(ema.module.state_dict(), a.save)
        torch.save(D.state_dict(), a.save + ".D")


if __name__ == "__main__":
    main()
