"""Peak memory and time of one image evaluation at `eval.num` 10,000 and 50,000 (the count FID
papers report), each in a fresh process, with our blockwise neighbour metrics and, as the
baseline, the `prdc` package's whole-matrix computation on the same features.

The features are 2,048 wide, as Inception's: a fixed random projection of the pixels
(`wide_features`), so the metrics' memory and time are what they are with Inception, without
Inception's cost on a CPU. Data: stacked digits (50,000 images); generator: uniform noise.
prdc's baseline runs where its three N x N matrices fit (`--prdc-max`, default 10,000: about
1.2 GB at 10,000, 30 GB at 50,000).

    python -m benchmarks.eval_memory [--nums 10000,50000] [--prdc-max 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from benchmarks.common import machine

FEATURES = 2048


class _Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(3 * 32 * 32, FEATURES, generator=g) / 55.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float() @ self.w


def wide_features() -> nn.Module:
    """`eval.features=benchmarks.eval_memory:wide_features`: images -> 2,048 features."""
    return _Projection()


def one(num: int, shards: str, baseline: bool) -> dict:
    """In this process: real and generated features at `eval.num=num`, then every image metric
    (ours) or prdc's four (the baseline); peak RSS and seconds of the whole."""
    from trainer.config import EvalConfig
    from trainer.eval import metrics
    from trainer.eval.evaluator import Evaluator, generate

    opts = EvalConfig(num=num, features="benchmarks.eval_memory:wide_features", batch_size=500)
    t0 = time.perf_counter()
    ev = Evaluator(shards, opts, progress=False)
    g = torch.Generator().manual_seed(1)
    noise = lambda z: torch.rand(len(z), 3, 32, 32, generator=g) * 2 - 1  # noqa: E731
    fake = ev._features(generate(noise, 8, num, opts.batch_size, opts.seed, "cpu"), num, "")
    t1 = time.perf_counter()
    if baseline:
        import prdc

        values = prdc.compute_prdc(ev.real.astype("float32"), fake.astype("float32"), opts.nearest_k)
    else:
        values = metrics.image_metrics(ev.real, fake, opts.nearest_k, opts.seed, opts.kid_subsets)
    return {
        "num": num,
        "num_real": len(ev.real),
        "features_seconds": round(t1 - t0, 1),
        "metrics_seconds": round(time.perf_counter() - t1, 1),
        "precision": round(float(values["precision"]), 4),
        "coverage": round(float(values["coverage"]), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nums", default="10000,50000")
    ap.add_argument("--prdc-max", type=int, default=10_000)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # num,shards,baseline
        num, shards, baseline = a.child.split(",")
        print(json.dumps(one(int(num), shards, baseline == "1")))
        return
    from data_pipeline.make_shards import MakeShardsConfig, write_shards

    root = tempfile.mkdtemp(prefix="eval-memory-")
    write_shards(
        MakeShardsConfig(source="stacked_digits", out=f"{root}/stacked", num_samples=50_000), progress=False
    )
    rows = []
    for num in (int(n) for n in a.nums.split(",")):
        for baseline in (False, True) if num <= a.prdc_max else (False,):
            child = [
                sys.executable,
                "-m",
                "benchmarks.eval_memory",
                "--child",
                f"{num},{root}/stacked,{int(baseline)}",
            ]
            proc = subprocess.run(child, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"with": "prdc" if baseline else "ours"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": machine("cpu", torch.get_num_threads()), "features": FEATURES, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
