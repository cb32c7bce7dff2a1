"""What evaluation costs: one `Evaluator` call against one training iteration, in one process.

The evaluation (`trainer/eval/evaluator.py`) draws N samples from the EMA generator, runs the
feature network, then FID/KID (torchmetrics) and precision/recall/density/coverage (prdc);
on 2-D data the mode metrics, SWD and MMD. Two evaluators are timed: `during`, built as the
worker builds it for `eval.every` (`trainer.train.worker.make_evaluator`: `eval.during_num`
samples, KID over 10 subsets), and `final`, the end-of-run one (`eval.num`, KID over 100).
Each is timed beside the loop's own training iteration (`GANStep` over DeepSpeed engines plus
the EMA update, lazy R1 every 4 D steps as `experiment=digits32` trains) on the same model,
interleaved in rounds, so the overhead of `eval.every=K` is eval ms / (K x iteration ms). Also
timed: the one-off real-data features (first call) and a cached start.

    python -m benchmarks.eval_cost [--rounds 3] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from benchmarks.common import init_dist, machine
from benchmarks.penalty_cost import make
from data_pipeline.make_shards import MakeShardsConfig, write_shards
from trainer.eval.evaluator import Evaluator
from trainer.gan.ema import EMA
from trainer.train.worker import make_evaluator


def shards(kind: str, root: str) -> str:
    cfg = (
        MakeShardsConfig(source="digits", out=f"{root}/digits", shard_size=600)
        if kind == "dcgan"
        else MakeShardsConfig(source="grid25", out=f"{root}/grid25", num_samples=100_000, shard_size=10_000)
    )
    write_shards(cfg, progress=False)
    return cfg.out


def iteration_ms(gan, ema: EMA, real: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        gan.d_step(real)
        gan.g_step(real.shape[0])
        ema.update(gan.G.module)
    return (time.perf_counter() - t0) / steps * 1000


def measure(arch: str, rounds: int, steps: int, root: str) -> dict:
    """Median ms of a training iteration and of one `during` and one `final` evaluation."""
    if arch == "mlp":  # the 2-D preset's shapes: MLP, R1 every 16th step, batch 256
        gan, cfg = make("r1", 16, 256, "mlp", latent=2)
        real, latent = torch.randn(256, 2), 2
    else:  # DCGAN-32 on the digits, R1 every 4th step, batch 64, FD-digits
        gan, cfg = make("r1", 4, 64, "dcgan")
        real, latent = torch.randn(64, 1, 32, 32), 100  # penalty_cost.make: latent 100
    ema = EMA(gan.G.module, 0.999)
    urls = shards(arch, root)
    cfg.eval.features, cfg.eval.cache_dir = "digits", f"{root}/cache"
    t0 = time.perf_counter()
    final = Evaluator(urls, cfg.eval, progress=False)  # computes and caches the real side
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    during = make_evaluator(cfg, urls, torch.device("cpu"))
    cached = time.perf_counter() - t0
    evaluators = {f"during_{cfg.eval.during_num}": during, f"final_{cfg.eval.num}": final}
    it_ms: list[float] = []
    eval_ms: dict[str, list[float]] = {k: [] for k in evaluators}
    for r in range(rounds + 1):  # round 0 warms up
        it = iteration_ms(gan, ema, real, steps)
        for name, ev in evaluators.items():
            t0 = time.perf_counter()
            ev(ema.module, latent)
            if r:
                eval_ms[name].append((time.perf_counter() - t0) * 1000)
        if r:
            it_ms.append(it)
    it = statistics.median(it_ms)
    out: dict = {
        "iteration_ms": round(it, 2),
        "real_side_first_s": round(first, 2),
        "cached_start_s": round(cached, 3),
    }
    for name, values in eval_ms.items():
        e = statistics.median(values)
        out[f"{name}_ms"] = round(e, 1)
        out[f"{name}_over_iteration"] = round(e / it, 1)
        out[f"{name}_overhead"] = {
            f"every {k}": f"{100 * e / (k * it):.1f} %" for k in (250, 500, 1000, 5000)
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="training iterations per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", default="dcgan,mlp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    init_dist("cpu")
    result = {"machine": machine("cpu", args.threads), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        for arch in args.arch.split(","):
            result[arch] = measure(arch, args.rounds, args.steps, root)
            print(arch, json.dumps(result[arch]), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
