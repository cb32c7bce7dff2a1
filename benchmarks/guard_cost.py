"""What the stability guard costs a healthy run: the same run with `stability=guarded` and with
the default (probe only), whole runs through `trainer.main`, interleaved (off, on, on, off, ...)
so that machine noise hits both arms alike. The guard adds a checkpoint before the first step
and, at every log and probe, its triggers and one broadcast of its decision; nothing per step.

Per run: training CPU seconds (the worker's own, `train_cpu_seconds`) and the run's wall
seconds (MLflow's start to end: Ray start-up and the end-of-run evaluation included, the same
in both arms). A guarded run that tripped is not healthy and is reported, not averaged.

    python -m benchmarks.guard_cost [--rounds 3] [--steps 300] [--experiment stable_images] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs (off and on), interleaved")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--experiment", default="stable_images")
    ap.add_argument("--store", default=str(ROOT / "runs" / "benchmarks" / "guard_cost"))
    args = ap.parse_args()
    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for guarded in order:
            one_run(store, args.experiment, args.steps, guarded, seed=r)
    result = summarize(collect(store))
    print(json.dumps(result, indent=1))
    (store / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
