"""What the stability guard costs a healthy run. The guard adds a checkpoint before the first
step and, at every log and probe, its triggers and one broadcast of its decision; nothing per
step. Two measurements:

- `micro` (in one process): one training iteration of the DCGAN-32 pair (R1 + R2, batch 64),
  one check of the guard's triggers on a log's and a probe's metrics, and one checkpoint of
  that pair, medians over rounds; the overhead of a run of `--steps` steps checked every
  `--log-every` is (checkpoint + checks x trigger) / (steps x iteration).
- `runs`: the same run with `stability=guarded` and with the default (probe only), whole runs
  through `trainer.main`, interleaved (off, on, on, off, ...) so that machine noise hits both
  arms alike: training CPU seconds (`train_cpu_seconds`) and wall seconds (MLflow's start to
  end), and the guard's rollbacks (a guarded run that tripped is reported, not averaged).
  Whole runs vary by more than the guard costs on a shared machine: read their noise first.

    python -m benchmarks.guard_cost micro [--steps 1000] [--log-every 50] [--rounds 5]
    python -m benchmarks.guard_cost runs [--rounds 3] [--steps 300] [--experiment stable_images] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(store: Path, experiment: str, steps: int, guarded: bool, seed: int) -> None:
    arm = "on" if guarded else "off"
    log_every = max(1, steps // 30)  # the guard checks at every log; checkpoints fall on one
    args = [
        f"experiment={experiment}",
        f"stability={'guarded' if guarded else 'default'}",
        f"name=guard-{arm}",
        f"trainer.seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={10 * log_every}",
        f"trainer.log_every={log_every}",
        "trainer.sample_every=0",
        f"trainer.storage_path={store / 'runs'}",
        "data.loader_workers=1",
        "tracking.register=false",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "tracking.experiment=guard-cost",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    print(f"+ guard {arm}, seed {seed}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "trainer.main", *args],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def collect(store: Path) -> dict[str, list[dict]]:
    """The store's finished runs per arm: CPU and wall seconds, and the guard's rollbacks."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("guard-cost")
    arms: dict[str, list[dict]] = {"guard-off": [], "guard-on": []}
    for r in client.search_runs([exp.experiment_id], max_results=1000) if exp else []:
        if r.info.status != "FINISHED" or "train_cpu_seconds" not in r.data.metrics:
            continue
        arms[r.data.params["name"]].append(
            {
                "seed": int(r.data.params["trainer.seed"]),
                "cpu_s": r.data.metrics["train_cpu_seconds"],
                "wall_s": (r.info.end_time - r.info.start_time) / 1000,
                "rollbacks": int(float(r.data.tags.get("stablegan.guard.rollbacks", 0))),
            }
        )
    return arms


def summarize(arms: dict[str, list[dict]]) -> dict:
    healthy = {k: [r for r in v if not r["rollbacks"]] for k, v in arms.items()}
    out: dict = {"runs": {k: len(v) for k, v in arms.items()}}
    out["tripped"] = [r for r in arms["guard-on"] if r["rollbacks"]]
    for key in ("cpu_s", "wall_s"):
        off = [r[key] for r in healthy["guard-off"]]
        on = [r[key] for r in healthy["guard-on"]]
        if off and on:
            med_off, med_on = statistics.median(off), statistics.median(on)
            out[key] = {
                "off": round(med_off, 1),
                "on": round(med_on, 1),
                "on_over_off": round(med_on / med_off, 3),
                "spread_off": [round(min(off), 1), round(max(off), 1)],
            }
    return out


def micro(steps: int, log_every: int, rounds: int) -> dict:
    """Medians of one iteration, one guard check and one checkpoint (ms), and the overhead."""
    import tempfile

    import torch

    from benchmarks.common import init_dist
    from benchmarks.penalty_cost import make
    from trainer.config import GuardConfig
    from trainer.gan.ema import EMA
    from trainer.train import checkpoint
    from trainer.train.guard import Guard

    torch.set_num_threads(1)
    init_dist("cpu")
    gan, cfg = make("r1r2", 1, 64, "dcgan")
    real, ema = torch.randn(64, 1, 32, 32), EMA(gan.G.module, 0.999)
    guard = Guard(GuardConfig(enabled=True), "r1r2", 0.05)
    metrics = {f"grad_norm/layer{i}": 1.0 + 0.01 * i for i in range(20)}
    metrics |= {"d_loss": 1.3, "g_loss": 0.8, "d_acc_real": 0.7, "d_acc_fake": 0.6, "sn_d": 3.0}
    metrics |= {"diversity": 0.5, "eval/fid": 40.0}
    it, check, save = [], [], []
    for r in range(rounds + 1):  # round 0 warms up
        t0 = time.perf_counter()
        for _ in range(10):
            gan.d_step(real)
            gan.g_step(64, real)
            ema.update(gan.G.module)
        t1 = time.perf_counter()
        for _ in range(100):
            guard.trigger(dict(metrics))
        t2 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(Path(tmp), 0, gan.G, gan.D, ema, 0, torch.Generator(), {}, asdict(cfg), {})
        t3 = time.perf_counter()
        if r:
            it.append((t1 - t0) * 100)
            check.append((t2 - t1) * 10)
            save.append((t3 - t2) * 1000)
    it_ms, check_ms, save_ms = (statistics.median(v) for v in (it, check, save))
    added = save_ms + (steps // log_every) * check_ms
    return {
        "iteration_ms": round(it_ms, 1),
        "guard_check_ms": round(check_ms, 4),
        "checkpoint_ms": round(save_ms, 1),
        "run": f"{steps} steps, a check every {log_every}",
        "overhead": f"{100 * added / (steps * it_ms):.3f} %",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["micro", "runs"])
    ap.add_argument("--log-every", type=int, default=50, help="micro: the guard checks at every log")
    ap.add_argument("--rounds", type=int, default=3, help="runs: pairs of runs (off, on); micro: rounds")
    ap.add_argument("--steps", type=int, help="runs: steps per run (300); micro: the run's length (1000)")
    ap.add_argument("--experiment", default="stable_images")
    ap.add_argument("--store", default=str(ROOT / "runs" / "benchmarks" / "guard_cost"))
    args = ap.parse_args()
    if args.command == "micro":
        print(
            json.dumps(
                {"machine": platform.node(), **micro(args.steps or 1000, args.log_every, args.rounds)},
                indent=1,
            )
        )
        return
    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for guarded in order:
            one_run(store, args.experiment, args.steps or 300, guarded, seed=r)
    result = summarize(collect(store))
    print(json.dumps(result, indent=1))
    (store / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
