"""What the image experiments share: running the trainer one run at a time, reading finished
runs back from the MLflow store, the mean ± sd cell and the run / table command line."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {sd:.2g}"


def train_each(store: Path, runs: list[tuple[str, list[str]]]) -> None:
    """`python -m trainer.main ARGS` for each (label, ARGS), one after the other, each on its
    own local Ray, into the store's MLflow database; a failed run's output tail is printed."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    for label, args in runs:
        print("+ python -m trainer.main", " ".join(args), flush=True)
        t0 = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "trainer.main", *args], env=env, cwd=store, capture_output=True, text=True
        )
        print(f"  {label}: exit {done.returncode}, {time.time() - t0:.0f}s", flush=True)
        if done.returncode:
            print(done.stdout[-2000:] + done.stderr[-2000:], flush=True)


def multirun(store: Path, label: str, args: list[str], env: dict, jobs: int) -> int:
    """`python -m trainer.main -m ARGS`, `jobs` runs at a time (joblib's launcher), runs and
    sweep folders under the store; its exit status, printed with the time it took."""
    cmd = [sys.executable, "-m", "trainer.main", "-m", *args, "hydra/launcher=joblib"]
    cmd += [f"hydra.launcher.n_jobs={jobs}", f"trainer.storage_path={store / 'runs'}"]
    cmd += [f"hydra.sweep.dir={store / 'multirun' / label}"]
    print("+", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, env=env, cwd=store)
    print(f"  {label}: exit {done.returncode}, {time.time() - t0:.0f}s", flush=True)
    return done.returncode


def finished_runs(store: Path, experiment: str) -> list:
    """The store's FINISHED MLflow runs of `experiment`, oldest first (a rerun comes later)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    found = (
        client.search_runs([exp.experiment_id], max_results=1000, order_by=["start_time ASC"]) if exp else []
    )
    return [r for r in found if r.info.status == "FINISHED"]


def cli(doc: str, store_name: str, methods: list[str], run: Callable, table: Callable, steps: int) -> None:
    """`run` (then the table) or `table`, with --seeds, --steps, --methods and --store."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--seeds", default="1000,1001,1002")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--methods", default=",".join(methods))
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / store_name))
    args = ap.parse_args()
    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        run(store, [int(s) for s in args.seeds.split(",")], args.steps, args.methods.split(","))
    result = table(store)
    (store / "table.json").write_text(json.dumps(result, indent=2))
