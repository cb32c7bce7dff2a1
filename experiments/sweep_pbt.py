"""Population-based training against random search at the same trial budget: both sweeps draw
the same 4 starting settings from `tune=lr_gamma` (one `tune.seed`) and train 4 trials of
digits32 for the same steps, all 4 at once; PBT lets the bottom quarter take the top
quarter's checkpoint over every quarter of the run. Reported: the final metric of each
sweep's best trial, per training seed (held-out: nothing was tuned on them), and CPU time.

    python -m experiments.sweep_pbt run --seeds 1000,1001
    python -m experiments.sweep_pbt table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from experiments.common import ROOT
from experiments.sweep_asha import METRIC, rows, timed_tune


def sweep_args(scheduler: str, store: Path, steps: int, seed: int) -> list[str]:
    return [
        "experiment=digits32",
        "tune=lr_gamma",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={steps // 4}",
        f"trainer.seed={seed}",
        "tune.num_samples=4",
        f"tune.scheduler={scheduler}",
        f"tune.perturbation_steps={steps // 4}",
        "tune.max_concurrent=4",
        "tune.seed=0",
        f"tune.name=pbt-{scheduler}-{seed}",
        f"tune.storage_path={store / 'tune'}",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "tracking.register=false",
        "cluster.num_cpus=4",  # 4 one-CPU trials at once on 2 cores, alike for both methods
    ]


def run(store: Path, steps: int, seeds: list[int]) -> None:
    store.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    timings = {}
    for seed in seeds:
        for scheduler in ("fifo", "pbt"):
            args = sweep_args(scheduler, store, steps, seed)
            timings[f"{scheduler}-{seed}"] = timed_tune(args, env)
    (store / "timings.json").write_text(json.dumps({"steps": steps, "seeds": seeds, **timings}, indent=1))


def table(store: Path) -> None:
    saved = json.loads((store / "timings.json").read_text())
    print(f"digits32, {saved['steps']} steps, 4 trials from tune=lr_gamma (tune.seed=0), all at once\n")
    print(
        f"| training seed | random: best {METRIC} | PBT: best {METRIC} | PBT takeovers | random CPU s | PBT CPU s |"
    )
    print("|---|---|---|---|---|---|")
    best = {"fifo": [], "pbt": []}
    for seed in saved["seeds"]:
        cells = {}
        for s in ("fifo", "pbt"):
            trials = rows(store / "tune" / f"pbt-{s}-{seed}" / "trials.csv")
            done = [float(r[METRIC]) for r in trials if r["ended"] == "completed"]
            cells[s] = min(done) if done else float("nan")
            best[s].append(cells[s])
            if s == "pbt":
                takeovers = sum(bool(r["lineage"]) for r in trials)
        f, p = saved[f"fifo-{seed}"], saved[f"pbt-{seed}"]
        print(
            f"| {seed} | {cells['fifo']:.2f} | {cells['pbt']:.2f} | {takeovers} of 4 trials | {f['cpu_s']:.0f} | {p['cpu_s']:.0f} |"
        )
    mean = {s: statistics.fmean(v) for s, v in best.items()}
    print(f"\nmean best {METRIC}: random {mean['fifo']:.2f}, PBT {mean['pbt']:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="1000,1001")
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "sweep_pbt"))
    a = ap.parse_args()
    if a.command == "run":
        run(Path(a.store), a.steps, [int(s) for s in a.seeds.split(",")])
    table(Path(a.store))
