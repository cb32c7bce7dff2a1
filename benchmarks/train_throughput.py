"""Training images/sec: stablegan's step (DeepSpeed engines) against a bare PyTorch loop.

Both sides use identical models, loss (non-saturating), optimizer (fused Adam) and the same
D forwards (real and fake in one batch; with R1, separate forwards and R1 from the reals' one),
so the ratio isolates what the engines cost. Synthetic batches in memory: the data pipeline
has its own benchmark.

    python -m benchmarks.train_throughput                        # CPU: DCGAN-32, batch 64, fp32
    python -m benchmarks.train_throughput --device cuda --resolution 64 --channels 3 \
        --precision bf16 --steps 300                             # GPU: DCGAN-64 bf16
    (--precision bf16_autocast: stablegan's fp32 weights under torch.autocast)
    python -m benchmarks.train_throughput --arch resnet --resolution 128 --channels 3 --width 64
                                                                 # the 128/256 px ResNet pair
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import init_dist, machine, sync
from trainer.config import Config, ModelConfig, ParallelConfig
from trainer.gan import losses, penalties
from trainer.gan.models import build_pair
from trainer.gan.step import GANStep
from trainer.train.engines import Engine


def make_cfg(args, penalty: str) -> Config:
    cfg = Config()
    cfg.model.arch, cfg.model.latent_dim = args.arch, 100
    cfg.model.resolution, cfg.model.channels = args.resolution, args.channels
    cfg.model.g_width = cfg.model.d_width = args.width
    cfg.penalty.kind, cfg.penalty.weight, cfg.penalty.interval = penalty, 1.0, 1
    cfg.parallel = ParallelConfig(zero_stage=args.zero_stage, precision=args.precision)
    cfg.data.batch_size = args.batch
    return cfg


def models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same freshly initialised pair for both sides, on the benchmark's device."""
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(
            arch=args.arch,
            latent_dim=100,
            resolution=args.resolution,
            channels=args.channels,
            g_width=args.width,
            d_width=args.width,
        )
    )
    return G.to(args.device), D.to(args.device)


def bench_stablegan(args, penalty: str, real: torch.Tensor) -> float:
    cfg = make_cfg(args, penalty)
    G, D = models(args)
    g = Engine(G, 2e-4, (0.5, 0.999), cfg.parallel, args.batch)
    d = Engine(D, 2e-4, (0.5, 0.999), cfg.parallel, args.batch)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))

    def one() -> None:
        step.d_step(real)
        step.g_step(args.batch)

    return timed(args, one)


def bench_bare(args, penalty: str, real: torch.Tensor) -> float:
    dev = torch.device(args.device)
    G, D = models(args)
    # fused=True as in trainer/train/engines.py: the comparison is of everything around the optimizer.
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999), fused=True)
    gen = torch.Generator().manual_seed(1)
    # The bare loop's bf16 is autocast over fp32 weights, against both of stablegan's bf16 modes.
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision != "fp32")

    def one() -> None:
        z = torch.randn(args.batch, 100, generator=gen).to(dev)
        with torch.no_grad(), autocast:
            fake = G(z).float()
        x = real.detach().requires_grad_(penalty == "r1")
        with autocast:
            # As GANStep.d_step: with R1, real and fake go through D separately so that the
            # double backward spans only the reals; without, one forward of both.
            if penalty == "r1":
                r, f = D(x).float(), D(fake).float()
            else:
                r, f = D(torch.cat([x, fake])).float().split(args.batch)
        loss = losses.nonsaturating_d(r, f)
        if penalty == "r1":
            loss = loss + 0.5 * penalties.r1_from_logits(r, x)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        D.requires_grad_(False)
        z = torch.randn(args.batch, 100, generator=gen).to(dev)
        with autocast:
            g_loss = losses.nonsaturating_g(D(G(z)).float())
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        D.requires_grad_(True)

    return timed(args, one)


def timed(args, one) -> float:
    for _ in range(args.warmup):
        one()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        one()
    sync(args.device)
    return args.batch * args.steps / (time.perf_counter() - start)  # real images through D per second


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="dcgan", choices=["dcgan", "resnet"])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--repeats", type=int, default=2, help="alternate bare/stablegan this many times; best of each"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16_autocast"])
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    init_dist(args.device)
    real = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=args.device) * 2 - 1
    host = machine(args.device, torch.get_num_threads())
    print(
        f"# DCGAN-{args.resolution} x{args.channels}ch, batch {args.batch}, {args.precision}, ZeRO {args.zero_stage}, "
        f"{args.steps} steps after {args.warmup} warm-up, on {host}; torch {torch.__version__}"
    )
    rows = []
    for penalty in ("none", "r1"):
        best = {"bare": 0.0, "stablegan": 0.0}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
            best["bare"] = max(best["bare"], bench_bare(args, penalty, real))
            best["stablegan"] = max(best["stablegan"], bench_stablegan(args, penalty, real))
        row = {
            "penalty": penalty,
            "bare_images_per_sec": round(best["bare"], 1),
            "stablegan_images_per_sec": round(best["stablegan"], 1),
            "ratio": round(best["stablegan"] / best["bare"], 3),
        }
        rows.append(row)
        print(
            f"penalty={penalty:5s} bare {row['bare_images_per_sec']:9.1f} img/s   stablegan "
            f"{row['stablegan_images_per_sec']:9.1f} img/s   ratio {row['ratio']:.3f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": host, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
