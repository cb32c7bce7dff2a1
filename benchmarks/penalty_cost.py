"""D-step time with gradient penalties: stablegan's step against a straightforward reference.

All in one process, on the same DeepSpeed engine and DCGAN-32, interleaved in rounds so that
machine noise hits every variant alike:

- `none`       our D step without a penalty (the floor);
- `r1`, `wgan_gp`, `r2`, `dragan`: our D step (real and fake in one forward; R1/R2 take their
  input gradient from that same forward, and the loss's gradient on the penalized half from
  the penalty's own backward pass: `penalties.loss_from_deltas`);
- `r1_plainloss`: our R1 step with the loss's own backward over both halves instead;
- `ref_r1_fused`: **the R1 reference**, the step a careful engineer writes (StyleGAN2-ADA's
  form): R1's input gradient from the same forward of the reals that the loss uses, D(fake)
  separate, one backward of the sum, through PyTorch's own layers and double backward;
- `ref_r1`, `ref_wgan_gp`: the textbook step: D(real) and D(fake) as separate forwards, then
  one more forward for the penalty and a plain `autograd.grad`, through PyTorch's own
  `nn.Conv2d` and `nn.LeakyReLU` (and their double backward). `ref_wgan_gp` is WGAN-GP's
  reference (its interpolates share no forward with the loss); `ref_r1` stays as a second,
  labelled R1 row (`r1_vs_textbook`). `ref_none`: the same step without a penalty, so that
  `penalty_cost_over_reference` compares what each penalty adds (its step minus its own
  no-penalty step) apart from the work both steps share;
- `none_nnlayers`, `r1_nnlayers`, `wgan_gp_nnlayers`: our step with PyTorch's own layers in D
  instead of the fast ops (`trainer.gan.ops`), which separates what the step's
  layout saves from what D's layers save in the double backward (and what they cost where no
  penalty runs);
- `r1_lazy16`: R1 every 16th D step with gain 16 (StyleGAN2), averaged over whole periods;
- with `--compile`, also `none`, `r1`, `wgan_gp` and `r1_lazy16` under `parallel.compile`
  (suffix `_compiled`): every forward compiled except the one the penalty differentiates twice.
  Compiling happens in the warm-up round, which is not timed.

`--arch mlp` times the 2-D preset's MLP 3x128 on batches of 256 points instead of DCGAN-32.

    python -m benchmarks.penalty_cost [--batch 64] [--rounds 5] [--steps 32] [--threads 2] \
        [--compile] [--arch dcgan|mlp] [--device cpu|cuda] [--precision fp32|bf16|fp16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import init_dist, machine, sync
from trainer.config import Config, ModelConfig
from trainer.gan import losses, ops
from trainer.gan.models import build_pair
from trainer.gan.step import GANStep
from trainer.train.engines import Engine


def make(
    kind: str,
    interval: int,
    batch: int,
    arch: str = "dcgan",
    compile_: bool = False,
    latent: int = 16,
    precision: str = "fp32",
) -> tuple[GANStep, Config]:
    """A `GANStep` over fresh DeepSpeed engines (`latent` is the MLP's latent size)."""
    cfg = Config()
    cfg.parallel.compile, cfg.parallel.precision = compile_, precision
    cfg.penalty.kind, cfg.penalty.interval = kind, interval
    cfg.data.batch_size = batch
    torch.manual_seed(0)
    if arch == "mlp":  # the 2-D preset's pair
        cfg.model.arch, cfg.model.latent_dim = "mlp", latent
        cfg.model.g_width = cfg.model.d_width = 128
        G, D = build_pair(ModelConfig(arch="mlp", latent_dim=latent, g_width=128, d_width=128))
    else:
        cfg.model.arch, cfg.model.latent_dim, cfg.model.channels = "dcgan", 100, 1
        cfg.model.g_width = cfg.model.d_width = 64
        G, D = build_pair(
            ModelConfig(arch="dcgan", latent_dim=100, resolution=32, channels=1, g_width=64, d_width=64)
        )
    g = Engine(G, 2e-4, (0.5, 0.999), cfg.parallel, batch)
    d = Engine(D, 2e-4, (0.5, 0.999), cfg.parallel, batch)
    return GANStep(g, d, cfg, torch.Generator().manual_seed(1)), cfg


def reference_step(gan: GANStep, kind: str, real: torch.Tensor) -> None:
    """The straightforward D step: three forwards, one plain autograd.grad (`kind` "none":
    the first two alone)."""
    D, d_loss = gan.D, losses.get("nonsaturating")[0]
    with torch.no_grad():
        fake = gan.G(gan.latent(real.shape[0]))
    if kind == "r1_fused":  # StyleGAN2-ADA: R1 from the loss's own forward of the reals
        x = real.detach().requires_grad_(True)
        real_logits = D(x)
        (grad,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
        loss = d_loss(real_logits, D(fake)) + 0.5 * grad.square().flatten(1).sum(1).mean()
        D.backward(loss)
        D.step()
        return
    loss = d_loss(D(real), D(fake))
    if kind == "r1":
        x = real.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        loss = loss + 0.5 * grad.square().flatten(1).sum(1).mean()
    elif kind == "wgan_gp":
        t = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
        x = (t * real + (1 - t) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        loss = loss + (grad.flatten(1).norm(dim=1) - 1).square().mean()
    elif kind != "none":
        raise ValueError(f"reference_step: no reference step for {kind!r} (none, r1, r1_fused, wgan_gp)")
    D.backward(loss)
    D.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="D steps per variant per round (a multiple of 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="add parallel.compile variants")
    ap.add_argument("--arch", default="dcgan", choices=["dcgan", "mlp"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "bf16_autocast"])
    ap.add_argument(
        "--json", default="", help="also write the result here (stdout carries DeepSpeed's notes)"
    )
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.precision == "fp16" and args.device != "cuda":
        ap.error("--precision fp16 needs --device cuda (DeepSpeed's loss scaling is GPU-only)")
    torch.set_num_threads(args.threads)
    init_dist(args.device)
    variants = {
        "none": ("none", 1),
        "ref_none": ("none", 1),
        "r1": ("r1", 1),
        "r1_plainloss": ("r1", 1),
        "ref_r1": ("r1", 1),
        "ref_r1_fused": ("r1", 1),
        "wgan_gp": ("wgan_gp", 1),
        "ref_wgan_gp": ("wgan_gp", 1),
        "r2": ("r2", 1),
        "dragan": ("dragan", 1),
        "r1_lazy16": ("r1", 16),
        "none_nnlayers": ("none", 1),
        "r1_nnlayers": ("r1", 1),
        "wgan_gp_nnlayers": ("wgan_gp", 1),
    }
    if args.compile:
        variants |= {f"{n}_compiled": variants[n] for n in ("none", "r1", "wgan_gp", "r1_lazy16")}
    steps = {
        name: make(kind, k, args.batch, args.arch, name.endswith("_compiled"), precision=args.precision)[0]
        for name, (kind, k) in variants.items()
    }
    for name, gan in steps.items():
        torch_layers = name.startswith("ref_") or name.endswith("_nnlayers")
        if torch_layers:
            ops.remove(gan.D.module)
        # r1_plainloss is the A/B of `penalties.loss_from_deltas`; PyTorch's layers record nothing.
        gan.share_backward = gan.share_backward and not torch_layers and name != "r1_plainloss"
    shape = (args.batch, 2) if args.arch == "mlp" else (args.batch, 1, 32, 32)
    real = torch.randn(*shape, device=args.device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, gan in steps.items():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                if name.startswith("ref_"):
                    reference_step(gan, name.removeprefix("ref_"), real)
                else:
                    gan.d_step(real)
            sync(args.device)
            if r:
                times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    ms = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "machine": machine(args.device, args.threads),
        "precision": args.precision,
        "torch": torch.__version__,
        "arch": args.arch,
        "batch": args.batch,
        "ms_per_d_step": {k: round(v, 2) for k, v in ms.items()},
        # R1 against the fused reference (StyleGAN2-ADA's form); WGAN-GP against its textbook step.
        "ours_over_reference": {
            "r1": round(ms["r1"] / ms["ref_r1_fused"], 3),
            "r1_plainloss": round(ms["r1_plainloss"] / ms["ref_r1_fused"], 3),
            "wgan_gp": round(ms["wgan_gp"] / ms["ref_wgan_gp"], 3),
            "r1_nnlayers": round(ms["r1_nnlayers"] / ms["ref_r1_fused"], 3),
            "wgan_gp_nnlayers": round(ms["wgan_gp_nnlayers"] / ms["ref_wgan_gp"], 3),
        },
        "r1_vs_textbook": {
            "r1": round(ms["r1"] / ms["ref_r1"], 3),
            "ref_r1_fused": round(ms["ref_r1_fused"] / ms["ref_r1"], 3),
        },
        "penalty_cost_over_reference": {
            "r1": round((ms["r1"] - ms["none"]) / (ms["ref_r1_fused"] - ms["ref_none"]), 3),
            "wgan_gp": round((ms["wgan_gp"] - ms["none"]) / (ms["ref_wgan_gp"] - ms["ref_none"]), 3),
        },
        "overhead_over_none": {k: round(ms[k] / ms["none"] - 1, 3) for k in ms if k != "none"},
    }
    if args.compile:
        result["compiled_over_eager"] = {
            n: round(ms[f"{n}_compiled"] / ms[n], 3) for n in ("none", "r1", "wgan_gp", "r1_lazy16")
        }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
