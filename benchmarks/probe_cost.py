"""What the stability probe costs: one probe against one training iteration, in one process.

The probe (`trainer/train/probe.py`, every `stability.every` steps on rank 0) takes spectral
norms by power iteration, per-layer gradient norms from an extra forward/backward, the loss
statistics, and then either PacGAN's mode metrics on 2,500 EMA samples (2-D) or diversity and
near-duplicates on 256 (images). Timed here on the loop's own pieces: `GANStep` over DeepSpeed
engines, the EMA update and `trainer.train.worker.make_probe`, interleaved in rounds so that machine
noise hits both alike. Overhead at K = probe ms / (K x iteration ms).

    python -m benchmarks.probe_cost [--rounds 5] [--steps 50] [--threads 1] [--arch mlp,dcgan]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import init_dist, machine
from benchmarks.penalty_cost import make
from trainer.gan.ema import EMA
from trainer.train.worker import make_probe


def measure(arch: str, rounds: int, steps: int) -> dict:
    """Median ms of one training iteration (D step, G step, EMA) and of one probe."""
    if arch == "mlp":  # the 2-D preset: MLP 3x128, latent 2, R1 0.1, batch 256, grid25
        gan, cfg = make("r1", 1, 256, "mlp", latent=2)
        cfg.data.builtin = "grid25"
        real = torch.randn(256, 2)
    else:  # DCGAN-32 on 1-channel images, R1, batch 64
        gan, cfg = make("r1", 1, 64, "dcgan")
        real = torch.randn(64, 1, 32, 32)
    ema = EMA(gan.G.module, 0.999)
    probe = make_probe(cfg, gan.G, gan.D, ema, gan)
    step_metrics = {"d_loss": 1.3, "g_loss": 0.8, "d_real": 0.4, "d_fake": -0.3}

    def iteration() -> None:
        gan.d_step(real)
        gan.g_step(real.shape[0])
        ema.update(gan.G.module)

    it_ms, probe_ms = [], []
    for r in range(rounds + 1):  # round 0 warms up (power-iteration warm-up, allocator)
        t0 = time.perf_counter()
        for _ in range(steps):
            iteration()
        t1 = time.perf_counter()
        signals = probe(real, step_metrics)
        t2 = time.perf_counter()
        if r:
            it_ms.append((t1 - t0) / steps * 1000)
            probe_ms.append((t2 - t1) * 1000)
    it, pr = statistics.median(it_ms), statistics.median(probe_ms)
    return {
        "iteration_ms": round(it, 2),
        "probe_ms": round(pr, 1),
        "probe_over_iteration": round(pr / it, 1),
        "overhead": {f"every {k}": f"{100 * pr / (k * it):.1f} %" for k in (100, 1000)},
        "signals": len(signals),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="training iterations per round (one probe each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", default="mlp,dcgan")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    init_dist("cpu")
    result = {
        "machine": machine("cpu", args.threads),
        "torch": torch.__version__,
    }
    for arch in args.arch.split(","):
        result[arch] = measure(arch, args.rounds, args.steps)
        print(arch, json.dumps(result[arch]), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
