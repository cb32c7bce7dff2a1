"""How close a stopped-and-resumed run comes to an uninterrupted one, per setting.

For each setting: one run of 60 steps, and one stopped at 40 and resumed (same run name) to
60, same seed; then the largest absolute difference over every G, D and EMA tensor of the
step-60 checkpoints. The real trainer, on a local Ray.

    python benchmarks/resume_determinism.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.train.checkpoint import load_parameters

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "1 worker, fp32": ["trainer.num_workers=1"],
    "2 workers, fp32": ["trainer.num_workers=2"],
    "2 workers, bf16": ["trainer.num_workers=2", "parallel=cpu_bf16"],
    "2 workers, bf16, ZeRO 2": ["trainer.num_workers=2", "parallel=cpu_bf16", "parallel.zero_stage=2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="stablegan-determinism-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    common = [
        "penalty=r1_lazy4",
        "trainer.log_every=10",
        "trainer.checkpoint_every=20",
        "trainer.sample_every=0",
        "trainer.seed=3",
        "data.loader_workers=1",
        "tracking.register=false",
        "stability=off",
    ]
    print("| setting | tensors | differing | max abs difference | max relative |")
    print("|---|---|---|---|---|")
    for i, (name, extra) in enumerate(SETTINGS.items()):
        storage = out / f"s{i}"
        t0 = time.time()
        for run, steps in (("straight", 60), ("split", 40), ("split", 60)):
            cmd = [sys.executable, "-m", "trainer.main", *common, *extra]
            cmd += [
                f"trainer.storage_path={storage}",
                f"trainer.run_name={run}",
                f"trainer.max_steps={steps}",
            ]
            done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name}: {run} failed:\n{done.stderr[-2000:]}")
        a = load_parameters(storage / "straight" / "checkpoint_00000060")
        b = load_parameters(storage / "split" / "checkpoint_00000060")
        diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
        rel = max(d / max(a[k].float().abs().max().item(), 1e-12) for k, d in diffs.items())
        differing = sum(d > 0 for d in diffs.values())
        print(
            f"| {name} | {len(a)} | {differing} | {max(diffs.values()):.3g} | {rel:.3g} |"
            f"  <!-- {time.time() - t0:.0f}s -->",
            flush=True,
        )


if __name__ == "__main__":
    main()
