"""Stacked digits (1,000 modes) baselines: the corrected seed DCGAN and the current image preset.

Each run trains the real trainer (`python -m trainer.main -m ...`, Hydra multirun over one Ray
head on loopback, as experiments/mode_collapse.py does) on `data.builtin=stacked_digits`
(three scikit-learn digits as RGB, 32x32, 50,000 samples), and its final EMA generator is scored
by the trainer's end-of-run evaluation (`eval.at_end`): FD-digits and KID on 10,000 samples,
precision/recall/density/coverage, and modes covered with their KL on 26,000 samples
(VEEGAN / PacGAN's protocol, per-channel digits classifier). The table reads those metrics
from the MLflow store and prints the real data's own row (scored the same way) and the seeds.

    python -m experiments.stacked_digits run [--seeds 1000,1001,1002] [--steps 2000] [--store DIR] \
        [--methods dcgan_vanilla,digits32]
    python -m experiments.stacked_digits table [--store DIR]

Methods: `dcgan_vanilla` is the seed article's DCGAN with its bugs fixed (model=dcgan32,
non-saturating loss, no penalty, Adam 1e-4, beta1 0.5, as the article sets it); `digits32` is
the digits preset (lazy R1 every 4 D steps, Adam 2e-4); `stable_images` the recommended image
preset as it ships (chosen by `experiments/recipes.py` since 2026-12-07; the `t_*` candidates
below chose the previous one on tuning seed 0, store stacked_digits-tuning). The
reported seeds are held out (1000 and up). `--lrs 1e-4,3e-4,1e-3,3e-3` sweeps G's and D's
learning rate together (use its own store, e.g. stacked_digits-lr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
from pathlib import Path

from experiments.common import mean_sd, multirun
from experiments.mode_collapse import ray_cluster

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "dcgan_vanilla": [
        "experiment=digits32",
        "penalty=none",
        "optim.g_lr=1e-4",
        "optim.d_lr=1e-4",
        "name=dcgan_vanilla",
    ],
    "digits32": ["experiment=digits32"],
    "stable_images": ["experiment=stable_images"],
    # 1,000 classes (the triple): the evaluation draws them uniformly (labels from z)
    "stable_images_conditional": ["experiment=stable_images", "model.conditional=true"],
}
# Candidates for experiment=stable_images, run on tuning seeds (0-99) into their own store
# (--store experiments/results/stacked_digits-tuning); the held-out table never includes them.
TUNING = {
    "t_sn_ttur": ["experiment=digits32", "model.spectral_norm=d", "optim.d_lr=4e-4", "optim.g_lr=1e-4"],
    "t_mbstd": ["experiment=digits32", "model.mbstd_group=4"],
    "t_lr_decay": [
        "experiment=digits32",
        "optim.g_lr=5e-4",
        "optim.d_lr=5e-4",
        "optim.beta2=0.99",
        "optim.lr_schedule=linear",
    ],
}
COMMON = [
    "data.builtin=stacked_digits",
    "model.channels=3",
    "tracking.register=false",
    "trainer.sample_every=0",
    "trainer.log_every=100",
    "trainer.checkpoint_every=500",
    "data.loader_workers=1",
    "eval.features=digits",
    "eval.every=0",  # the score is the end-of-run evaluation; evaluation cost: benchmarks/eval_cost.py
]
PUBLISHED = [  # PacGAN Table 3 (Stacked-MNIST, 26,000 samples): modes, KL
    ("DCGAN (PacGAN Table 3)", 99.0, 3.40),
    ("VEEGAN (PacGAN Table 3)", 150.0, 2.95),
    ("PacDCGAN2 (PacGAN Table 3)", 1000.0, 0.06),
]
KEYS = ("fid", "kid", "precision", "recall", "density", "coverage", "modes", "mode_kl", "memorization")


def run(store: Path, seeds: str, steps: int, jobs: int, methods: list[str], lrs: str = "") -> None:
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)  # created once: parallel jobs race on a new sqlite schema
    if client.get_experiment_by_name("stacked-digits") is None:
        client.create_experiment("stacked-digits")
    with contextlib.ExitStack() as stack:
        env.update(stack.enter_context(ray_cluster(store, jobs)))
        for method in methods:
            args = {**METHODS, **TUNING}[method]
            args = [*args, f"name={method}"] if method in TUNING else args
            args = [f"trainer.seed={seeds}", *args, *COMMON]
            if lrs:  # the learning-rate sweep: G's and D's lr together
                args += [f"optim.g_lr={lrs}", "optim.d_lr=${optim.g_lr}"]
            args += [f"trainer.max_steps={steps}", "tracking.experiment=stacked-digits"]
            multirun(store, method, args, env, jobs)


def collect(store: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stacked-digits")
    rows: dict[tuple[str, int], dict] = {}  # a rerun of a (method, seed) replaces the older run
    found = (
        client.search_runs([exp.experiment_id], max_results=1000, order_by=["start_time ASC"]) if exp else []
    )
    for r in found:
        m = r.data.metrics
        if r.info.status != "FINISHED" or "eval/modes" not in m:
            continue
        p = r.data.params
        rows[(p["name"], int(p["trainer.seed"]), p["optim.g_lr"])] = {
            "method": r.data.params["name"],
            "lr": float(p["optim.g_lr"]),
            "seed": int(r.data.params["trainer.seed"]),
            "steps": int(r.data.params["trainer.max_steps"]),
            "cpu_seconds": m.get("train_cpu_seconds"),
            "wall_seconds": (r.info.end_time - r.info.start_time) / 1000,
            **{k: m.get(f"eval/{k}", math.nan) for k in KEYS},  # nan: measured before the metric
        }
    return list(rows.values())


def data_row(store: Path) -> dict:
    """The store's stacked-digit shards scored as a generator would be (`real_row`)."""
    return real_row(next((store / "runs" / "datasets").glob("stacked_digits-*")))


def real_row(shards: Path) -> dict:
    """Real shards scored as a generator would be (half against half; modes on 26,000)."""
    from trainer.config import EvalConfig
    from trainer.eval.evaluator import Evaluator

    ev = Evaluator(str(shards), EvalConfig(features="digits", num=20_000), progress=False)
    return ev.data_row().metrics


def table(store: Path) -> dict:
    rows = collect(store)
    data = data_row(store)
    seeds = sorted({r["seed"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    lines = [
        f"Stacked digits, 1,000 modes; {'held-out' if min(seeds, default=0) >= 1000 else 'TUNING'} seeds "
        f"{seeds}; {steps} steps; mean ± sd over seeds",
        "",
        "| method | runs | FD-digits | KID | precision | recall | density | coverage | modes (of 1,000) "
        "| KL | memorization | training CPU s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| real data (half vs half; modes on 26,000 real) | | "
        + " | ".join(f"{data[k]:.3g}" for k in KEYS)
        + " | |",
    ]
    for method in {**METHODS, **TUNING}:
        sub = [r for r in rows if r["method"] == method]
        if not sub:
            continue
        cpu = [r["cpu_seconds"] for r in sub if r["cpu_seconds"] is not None]
        cells = " | ".join(mean_sd([r[k] for r in sub]) for k in KEYS)
        lines.append(f"| {method} | {len(sub)} | {cells} | {statistics.fmean(cpu):.0f} |")
    for name, modes, kl in PUBLISHED:
        lines.append(f"| {name} | | | | | | | | {modes:.0f} | {kl} | | |")
    lines += lr_table(rows)
    print("\n".join(lines))
    return {"rows": rows, "data": data, "seeds": seeds, "markdown": "\n".join(lines)}


def lr_table(rows: list[dict]) -> list[str]:
    """Runs reaching 990 modes per method and learning rate, when a method ran at several."""
    lrs = {m: sorted({r["lr"] for r in rows if r["method"] == m}) for m in {r["method"] for r in rows}}
    if all(len(v) < 2 for v in lrs.values()):
        return []
    out = [
        "",
        "| method | lr (G and D) | runs | runs with >= 990 modes | modes | KL | FD-digits |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, values in sorted(lrs.items()):
        for lr in values:
            sub = [r for r in rows if r["method"] == method and r["lr"] == lr]
            hit = sum(r["modes"] >= 990 for r in sub)
            cells = " | ".join(mean_sd([r[k] for r in sub]) for k in ("modes", "mode_kl", "fid"))
            out.append(f"| {method} | {lr:g} | {len(sub)} | {hit} | {cells} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--seeds", default="1000,1001,1002")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--lrs", default="", help="a learning-rate sweep for G and D, e.g. 1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join({**METHODS, **TUNING})}")
    ap.add_argument("--store", default=str(ROOT / "experiments" / "results" / "stacked_digits"))
    args = ap.parse_args()
    store = Path(args.store).resolve()
    if args.command == "run":
        run(store, args.seeds, args.steps, args.jobs, args.methods.split(","), args.lrs)
    result = table(store)
    (store / "table.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
