"""The stability guard on images: two drills on stacked digits (1,000 modes) on the same
held-out seeds and steps: the fault unguarded, the fault guarded (`stability=guarded`), beside
one fault-free control (the preset as it ships, shared by both drills). Every run starts from
`experiment=stable_images` as it ships. Use 2,000 steps or more: stacked-digit runs of the previous
preset turned over between steps ~1,200 and 2,000 (at 1,200 even the control had not converged).

    python -m experiments.guard_drills run [--seeds 1000] [--steps 2000] [--jobs 2] [--store DIR]
    python -m experiments.guard_drills table [--store DIR]

Drills:
- `lr_blowup`: learning rate 1e-2 for G and D and no penalty (the preset's R1 + R2 off). Control:
  the preset. Pass: guarded ends with at least 900 modes where unguarded collapses.
- `nan_batch`: one all-NaN batch at step 600 (`trainer.inject_nan_at`). Control: no fault.
  Pass: guarded ends within 10 % of the control's FD-digits.

The guard's triggers read only what a user has on real data (trainer/train/guard.py): non-finite
values, loss spikes, a saturated D, a spectral blow-up, the diversity of a fixed latent batch
and the in-training FD (`eval.every`, on here every 250 steps with 2,000 samples). Scores are
the end-of-run evaluation (10,000 samples; modes and KL on 26,000), read from MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments.mode_collapse import ray_cluster

ROOT = Path(__file__).resolve().parent.parent
PRESET = ["experiment=stable_images", "data.builtin=stacked_digits", "model.channels=3"]
DRILLS = {
    "lr_blowup": ["optim.g_lr=1e-2", "optim.d_lr=1e-2", "penalty=none"],
    "nan_batch": ["trainer.inject_nan_at=600"],
}
GUARD = {"unguarded": ["stability=default"], "guarded": ["stability=guarded"]}  # the preset ships guarded
COMMON = [
    "tracking.register=false",
    "trainer.sample_every=0",
    "trainer.log_every=50",
    "trainer.checkpoint_every=250",
    "trainer.keep_checkpoints=4",
    "data.loader_workers=1",
    "eval.features=digits",
    "eval.every=250",
    "tracking.experiment=guard-drills",
]
KEYS = ("fid", "modes", "mode_kl", "recall", "memorization")


def commands(store: Path, seeds: list[int], steps: int) -> list[list[str]]:
    """One fault-free control per seed (both drills' control: the preset as it ships), then
    each drill unguarded and guarded."""
    variants = [("control", [])]
    variants += [
        (f"{drill}-{v}", [*fault, *extra]) for drill, fault in DRILLS.items() for v, extra in GUARD.items()
    ]
    out = []
    for name, extra in variants:
        for seed in seeds:
            args = [*PRESET, *COMMON, *extra]
            args += [
                f"trainer.seed={seed}",
                f"trainer.max_steps={steps}",
                f"name={name}",
                f"trainer.run_name={name}-s{seed}-{steps}",
                f"trainer.storage_path={store / 'runs'}",
            ]
            out.append([sys.executable, "-m", "trainer.main", *args])
    return out


def run(store: Path, seeds: list[int], steps: int, jobs: int) -> None:
    store.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # created once: parallel runs race on a new schema
    if client.get_experiment_by_name("guard-drills") is None:
        client.create_experiment("guard-drills")

    def one(cmd: list[str]) -> None:
        name = next(a for a in cmd if a.startswith("trainer.run_name="))
        t0 = time.time()
        done = subprocess.run(cmd, env=env, cwd=store, capture_output=True, text=True)
        print(f"  {name}: exit {done.returncode}, {time.time() - t0:.0f}s", flush=True)
        (store / "logs").mkdir(exist_ok=True)
        (store / "logs" / f"{name.split('=')[1]}.log").write_text(done.stdout + done.stderr)

    with contextlib.ExitStack() as stack:
        env.update(stack.enter_context(ray_cluster(store, jobs)))
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, commands(store, seeds, steps)))


def collect(store: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("guard-drills")
    rows: dict[tuple[str, int], dict] = {}
    for r in (
        client.search_runs([exp.experiment_id], max_results=1000, order_by=["start_time ASC"]) if exp else []
    ):
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        if r.info.status != "FINISHED":
            continue
        rows[(p["name"], int(p["trainer.seed"]))] = {
            "run": p["name"],
            "seed": int(p["trainer.seed"]),
            "steps": int(p["trainer.max_steps"]),
            "diverged": t.get("stablegan.diverged"),
            "rollbacks": t.get("stablegan.guard.rollbacks", ""),
            "triggers": t.get("stablegan.guard.triggers", ""),
            "cpu_seconds": m.get("train_cpu_seconds"),
            **final_scores(client, r.info.run_id, int(p["trainer.max_steps"])),
        }
    return sorted(rows.values(), key=lambda r: (r["run"], r["seed"]))


def final_scores(client, run_id: str, steps: int) -> dict[str, float]:
    """The end-of-run evaluation's scores (logged at the last step), NaN where there is none:
    the latest eval/* value may be an in-training one from before the run diverged."""
    out = {}
    for k in KEYS:
        at_end = [m.value for m in client.get_metric_history(run_id, f"eval/{k}") if m.step == steps]
        out[k] = at_end[-1] if at_end else float("nan")
    return out


def table(store: Path) -> dict:
    rows = collect(store)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"Guard drills on stacked digits, experiment=stable_images, held-out seeds {seeds}",
        "",
        "| drill / run | seed | steps | FD-digits | modes (of 1,000) | KL | recall | memorization | diverged "
        "| rollbacks | triggers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[k]:.0f}" if k == "modes" and r[k] == r[k] else f"{r[k]:.3g}" for k in KEYS)
        lines.append(
            f"| {r['run']} | {r['seed']} | {r['steps']} | {cells} | {r['diverged']} | {r['rollbacks']} | {r['triggers']} |"
        )
    print("\n".join(lines))
    return {"rows": rows, "seeds": seeds, "markdown": "\n".join(lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--seeds", default="1000")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "guard_drills"))
    args = ap.parse_args()
    store = Path(args.store).resolve()
    if args.command == "run":
        run(store, [int(s) for s in args.seeds.split(",")], args.steps, args.jobs)
    result = table(store)
    (store / "table.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
