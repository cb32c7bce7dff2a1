"""Mode-collapse benchmark against published tables (PacGAN, Lin et al. 2018, Table 1).

Runs the sweeps as Hydra multiruns of the real trainer (`python -m trainer.main -m ...`), each
into its own MLflow experiment, then builds the tables from the MLflow store (not from stdout):
the trainer's end-of-run evaluation scores 10,000 samples of the final EMA generator with
PacGAN's definitions (modes, high quality, reverse KL) plus two numbers that samples piled on
the mode centres cannot fake: spread and the sliced Wasserstein distance to fresh data draws
(trainer/eval/metrics.py). Every table prints the data's own row (fresh draws scored the same
way), the seeds, and per row the resolved config's hash and its difference from the preset.

Reporting seeds start at 1000 (`--first-seed`): seeds 0-9 (grid25), 0-4 (ring8) and 100-102
(robustness) tuned the `stable` preset and are not reported as held-out results. `--jobs 2` (the default) runs two at a time
with Hydra's joblib launcher over one Ray head that this script starts on loopback
(launch/local_cluster.sh) and stops; each run trains on one worker with one CPU.

    python experiments/mode_collapse.py run [--sweeps main,robustness] [--store DIR] [--jobs 2] \
        [--grid-seeds 10] [--ring-seeds 5] [--first-seed 1000] [--set trainer.max_steps=4000 ...]
    python experiments/mode_collapse.py table [--store DIR]      # markdown to stdout + JSON

Sweeps: `main`: vanilla (non-saturating, no penalty, no SN) vs the recommended `stable`
preset, 10 seeds on grid25 and 5 on ring8. `robustness`: both on grid25, learning rate in
{1e-4, 3e-4, 1e-3, 3e-3} (G and D) x 3 seeds; reported as the fraction of runs covering all modes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {  # PacGAN Table 1: modes, high-quality %, reverse KL
    "grid25": [("GAN", 17.3, 94.8, 0.70), ("PacGAN4", 24.8, 93.6, 0.04)],
    "ring8": [("GAN", 6.3, 98.2, 0.45), ("PacGAN2", 7.9, 95.6, 0.07)],
}
# 2-D points are cheap to read: the loader runs in the training process rather than in a loader
# worker that competes with training for a small machine's cores.
COMMON = ["tracking.register=false", "trainer.sample_every=0", "data.loader_workers=0"]
# The 2-D guard drills pin the preset they were reported with (one MLP of 256, R1 on every D step,
# 4,000 steps, lr 1e-3, beta2 0.999), so that their table stays reproducible as presets change.
GUARD_PIN = [
    "trainer.max_steps=4000",
    "model.g_width=256",
    "model.d_width=256",
    "model.latent_dim=16",
    "model.g_experts=0",
    "model.g_expert_prior=uniform",
    "penalty.interval=1",
    "trainer.log_every=100",
]


def sweeps(
    grid_seeds: int = 10,
    ring_seeds: int = 5,
    robust_seeds: int = 3,
    robust_first: int = 1100,
    presets: str = "vanilla,stable",
    first_seed: int = 1000,
) -> dict[str, list[list[str]]]:
    """Sweep name -> the multirun argument lists it consists of.

    `presets` and `robust_first` run part of a sweep, e.g. only the preset that changed, or one
    more robustness seed, into the same experiments as the runs already there."""
    seeds10 = ",".join(str(first_seed + i) for i in range(grid_seeds))
    seeds5 = ",".join(str(first_seed + i) for i in range(ring_seeds))
    return {
        "main": [
            [
                f"experiment={presets}",
                "data.builtin=grid25",
                f"trainer.seed={seeds10}",
                "stability.every=1000",
            ],
            [
                f"experiment={presets}",
                "data.builtin=ring8",
                f"trainer.seed={seeds5}",
                "stability.every=1000",
            ],
        ],
        # The stability guard's drills (issue: a deliberately unstable run recovers): each run
        # once unguarded (stability=default) and once guarded, checkpointing every 500 steps.
        "guard": [
            [
                "trainer.seed=0,1",
                "stability=default,guarded",
                "experiment=stable",
                "data.builtin=ring8",
                "trainer.inject_nan_at=1500",  # a poisoned batch
                "optim.g_lr=1e-3",
                "optim.d_lr=1e-3",
                "optim.beta2=0.999",
                *GUARD_PIN,
                "trainer.checkpoint_every=500",
                "trainer.keep_checkpoints=4",
                "stability.every=100",  # the guard sees coverage every 100 steps
            ],
            [
                "trainer.seed=0,1",
                "stability=default,guarded",
                "experiment=vanilla",
                "data.builtin=grid25",
                "optim.g_lr=1e-2",  # far too high, no penalty
                "optim.d_lr=1e-2",
                *GUARD_PIN,
                "trainer.checkpoint_every=500",
                "trainer.keep_checkpoints=4",
                "stability.every=100",  # the guard sees coverage every 100 steps
            ],
        ],
        "robustness": [
            [
                # The first override varies slowest: a cut-short sweep still has whole seeds.
                f"trainer.seed={','.join(str(robust_first + i) for i in range(robust_seeds))}",
                "optim.g_lr=1e-4,3e-4,1e-3,3e-3",
                f"experiment={presets}",
                "data.builtin=grid25",
                "optim.d_lr=${optim.g_lr}",
                "stability.every=1000",
            ]
        ],
    }


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(store: Path, cpus: int) -> Iterator[dict[str, str]]:
    """A Ray head of `cpus` CPUs on loopback (launch/local_cluster.sh, no worker nodes, no MLflow
    server), shared by the parallel jobs of the sweeps; stopped on the way out in any case."""
    env = {
        **os.environ,
        "STABLEGAN_HEAD_IP": "127.0.0.5",  # apart from the script's default 127.0.0.2 and tests
        "STABLEGAN_RAY_PORT": str(free_port("127.0.0.5")),
        "STABLEGAN_DASHBOARD_PORT": str(free_port("127.0.0.5")),
        "STABLEGAN_STATE_DIR": str(store / "cluster"),
        "STABLEGAN_WORKERS": "0",
        "STABLEGAN_HEAD_CPUS": str(cpus),
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    script = [str(ROOT / "launch" / "local_cluster.sh")]
    try:
        up = subprocess.run(
            [*script, "up", "--no-mlflow"], env=env, capture_output=True, text=True, timeout=300
        )
        if up.returncode:
            raise SystemExit(f"could not start the benchmark's Ray cluster:\n{up.stderr}{up.stdout}")
        info = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line and line[0] != "#")
        print(f"Ray head at {info['RAY_ADDRESS']} with {cpus} CPUs, {cpus} runs at a time", flush=True)
        yield {"RAY_ADDRESS": info["RAY_ADDRESS"], "RAY_AUTH_MODE": "token"}
    finally:
        subprocess.run([*script, "down"], env=env, capture_output=True, timeout=120)


def run(names: list[str], store: Path, extra: list[str], jobs: int = 2, **sweep_args: int | str) -> None:
    """Run the named sweeps into `store`, `jobs` runs at a time (Hydra's joblib launcher over one
    shared Ray cluster; each run trains on one worker with one CPU)."""
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    launcher: list[str] = []
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            from mlflow.tracking import MlflowClient

            # Created here, once: parallel jobs creating the store's schema or an experiment
            # at the same moment race on sqlite (mlflow/mlflow#4123).
            client = MlflowClient(uri)
            for name in names:
                if client.get_experiment_by_name(f"bench-{name}") is None:
                    client.create_experiment(f"bench-{name}")
            env.update(stack.enter_context(ray_cluster(store, jobs)))
            launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
        for name in names:
            for args in sweeps(**sweep_args)[name]:
                cmd = [sys.executable, "-m", "trainer.main", "-m", *args, *COMMON, *launcher, *extra]
                cmd += [f"tracking.experiment=bench-{name}", f"trainer.storage_path={store / 'runs'}"]
                cmd += [f"hydra.sweep.dir={store / 'multirun' / name}"]
                print("+", " ".join(cmd[1:]), flush=True)
                t0 = time.time()
                done = subprocess.run(cmd, env=env, cwd=store)
                if done.returncode:  # a failed run is left out of the tables (FAILED in MLflow)
                    print(f"  some runs failed (exit {done.returncode}); continuing", flush=True)
                print(f"  sweep part done in {time.time() - t0:.0f}s", flush=True)


# Run-specific keys, not part of what a row's config hash describes.
RUN_KEYS = ("trainer.seed", "trainer.storage_path", "trainer.run_name", "tracking.experiment", "tracking.uri")


def config_hash(params: dict[str, str]) -> str:
    """A short hash of a run's resolved config (its MLflow params), seed and paths left out."""
    kept = {k: v for k, v in sorted(params.items()) if k not in RUN_KEYS}
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:10]


@functools.cache
def preset_params(preset: str, data: str) -> dict[str, str]:
    from dataclasses import asdict

    from trainer.main import compose
    from trainer.services.tracking import flatten

    return {
        k: str(v)
        for k, v in flatten(asdict(compose([f"experiment={preset}", f"data.builtin={data}"]))).items()
    }


def preset_diff(params: dict[str, str]) -> str:
    """`key=value` for every resolved value that differs from the named preset's."""
    base = preset_params(params["name"], params["data.builtin"])
    diff = [f"{k}={v}" for k, v in sorted(params.items()) if k not in RUN_KEYS and base.get(k) != v]
    return " ".join(diff) or "(the preset as is)"


def collect(store: Path, name: str) -> list[dict]:
    """One row per finished run of sweep `name`: its params and final mode metrics (the
    end-of-run evaluation's, on 10,000 samples; the last probe's, on 2,500, for older runs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"bench-{name}")
    if exp is None:
        return []
    rows = []
    for r in client.search_runs([exp.experiment_id], max_results=5000):
        m, p = r.data.metrics, r.data.params
        src = "eval/" if "eval/modes_covered" in m else ""
        if r.info.status != "FINISHED" or f"{src}modes_covered" not in m:
            continue
        rows.append(
            {
                "preset": p["name"],
                "data": p["data.builtin"],
                "seed": int(p["trainer.seed"]),
                "lr": float(p["optim.g_lr"]),
                "steps": int(p["trainer.max_steps"]),
                "scored_on": "eval, 10,000 samples" if src else "probe, 2,500 samples",
                "modes": m[f"{src}modes_covered"],
                "hq": 100 * m[f"{src}high_quality"],
                "kl": m[f"{src}reverse_kl"],
                "spread": m.get(f"{src}spread"),
                "swd": m.get("eval/swd"),
                "mmd": m.get("eval/mmd"),
                "config_hash": config_hash(p),
                "config_diff": preset_diff(p),
                "seconds": (r.info.end_time - r.info.start_time) / 1000,
                "cpu_seconds": m.get("train_cpu_seconds"),  # older runs did not log it
                "guarded": p.get("stability.guard.enabled") == "True",
                "nan_at": int(p.get("trainer.inject_nan_at", 0)),
                "rollbacks": int(r.data.tags.get("stablegan.guard.rollbacks", 0)),
                "triggers": r.data.tags.get("stablegan.guard.triggers", ""),
                "diverged": r.data.tags.get("stablegan.diverged", ""),
            }
        )
    return rows


def data_rows(store: Path) -> dict[str, dict[str, float]]:
    """Each dataset's own score: fresh draws scored exactly as a generator's samples are."""
    from trainer.config import EvalConfig
    from trainer.eval.evaluator import Evaluator

    out = {}
    for data in ("grid25", "ring8"):
        shards = store / "runs" / "datasets" / data
        if (shards / "manifest.json").is_file():
            out[data] = Evaluator(str(shards), EvalConfig(), progress=False).data_row().metrics
    return out


def mean_se(values: list[float], digits: int | None = None) -> str:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    digits = digits if digits is not None else (2 if abs(m) < 10 else 1)
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def main_table(rows: list[dict], data_scores: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    for data, n_modes in (("grid25", 25), ("ring8", 8)):
        seeds = sorted({r["seed"] for r in rows if r["data"] == data})
        lines += [
            f"\n{data}: seeds {seeds}; mean ± standard error over seeds\n",
            "| method | runs | modes | high quality % | reverse KL | spread | SWD to data | MMD to data "
            "| all modes in every run | config | training CPU s/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        if data in data_scores:
            d = data_scores[data]
            lines.append(
                f"| the data itself (fresh draws) | | {d['modes_covered']:.0f} | {100 * d['high_quality']:.1f} "
                f"| {d['reverse_kl']:.4f} | {d['spread']:.3f} | {d['swd']:.4f} | {d['mmd']:.4f} | | | |"
            )
        for preset in ("vanilla", "stable"):
            sub = [r for r in rows if r["data"] == data and r["preset"] == preset]
            if not sub:
                continue
            full = sum(r["modes"] == n_modes for r in sub)
            cpu = [r["cpu_seconds"] for r in sub if r.get("cpu_seconds") is not None]
            spread = [r["spread"] for r in sub if r["spread"] is not None]
            swd = [r["swd"] for r in sub if r["swd"] is not None]
            mmd = [r["mmd"] for r in sub if r.get("mmd") is not None]
            hashes = ", ".join(sorted({r["config_hash"] for r in sub}))
            lines.append(
                f"| stablegan {preset} | {len(sub)} | {mean_se([r['modes'] for r in sub])} "
                f"| {mean_se([r['hq'] for r in sub])} | {mean_se([r['kl'] for r in sub], 3)} "
                f"| {mean_se(spread, 3) if spread else '-'} | {mean_se(swd, 4) if swd else '-'} "
                f"| {mean_se(mmd, 4) if mmd else '-'} "
                f"| {full}/{len(sub)} | {hashes} | {f'{statistics.fmean(cpu):.0f}' if cpu else '-'} |"
            )
        for method, modes, hq, kl in PUBLISHED[data]:
            lines.append(f"| {method} (PacGAN paper) | | {modes} | {hq} | {kl} | | | | | | |")
    configs = {(r["config_hash"], r["preset"], r["config_diff"]) for r in rows}
    lines += ["", "Configs (resolved config hash: the preset and what differs from it):", ""]
    lines += [f"- `{h}`: {preset} + {diff}" for h, preset, diff in sorted(configs)]
    return lines


def table(store: Path) -> dict:
    main_rows, robust_rows = collect(store, "main"), collect(store, "robustness")
    data_scores = data_rows(store)
    out: dict = {"main": main_rows, "robustness": robust_rows, "data": data_scores}
    lines = main_table(main_rows, data_scores) if main_rows else []
    if robust_rows:
        lines += [
            "\ngrid25 robustness: runs covering all 25 modes, per learning rate (G and D)\n",
            "| preset | " + " | ".join(f"lr {lr:g}" for lr in (1e-4, 3e-4, 1e-3, 3e-3)) + " | all |",
            "|---|---|---|---|---|---|",
        ]
        for preset in ("vanilla", "stable"):
            rows = [r for r in robust_rows if r["preset"] == preset]
            cells = []
            for lr in (1e-4, 3e-4, 1e-3, 3e-3):
                sub = [r for r in rows if math.isclose(r["lr"], lr)]
                cells.append(f"{sum(r['modes'] == 25 for r in sub)}/{len(sub)}")
            total = sum(r["modes"] == 25 for r in rows)
            lines.append(f"| {preset} | " + " | ".join(cells) + f" | {total}/{len(rows)} |")
    guard_rows = collect(store, "guard")
    out["guard"] = guard_rows
    if guard_rows:
        lines += [
            "\nStability guard drills: the same unstable run unguarded and guarded (final EMA probe)\n",
            "| drill | data | seed | guard | rollbacks (triggers) | modes | HQ % | KL | diverged tag |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(guard_rows, key=lambda r: (r["data"], r["seed"], r["guarded"])):
            drill = f"NaN batch at step {r['nan_at']}" if r["nan_at"] else f"lr {r['lr']:g}, no penalty"
            lines.append(
                f"| {drill} | {r['data']} | {r['seed']} | {'on' if r['guarded'] else 'off'} "
                f"| {r['rollbacks']} ({r['triggers'] or '-'}) | {r['modes']:.0f} | {r['hq']:.1f} "
                f"| {r['kl']:.2f} | {r['diverged']} |"
            )
    print("\n".join(lines))
    out["markdown"] = "\n".join(lines)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--sweeps", default="main,robustness")
    ap.add_argument("--grid-seeds", type=int, default=10)
    ap.add_argument("--ring-seeds", type=int, default=5)
    ap.add_argument("--robust-seeds", type=int, default=3)
    ap.add_argument("--robust-first", type=int, default=1100, help="first robustness seed")
    ap.add_argument("--first-seed", type=int, default=1000, help="first seed of the main sweep")
    ap.add_argument("--presets", default="vanilla,stable", help="presets of the main and robustness sweeps")
    ap.add_argument(
        "--set", nargs="*", default=[], help="extra overrides for every run (e.g. trainer.max_steps=300)"
    )
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "mode_collapse"))
    ap.add_argument(
        "--jobs", type=int, default=2, help="runs at a time (1: one after another, no shared cluster)"
    )
    args = ap.parse_args()
    store = Path(args.store).resolve()
    if args.command == "run":
        run(
            args.sweeps.split(","),
            store,
            args.set,
            jobs=args.jobs,
            grid_seeds=args.grid_seeds,
            ring_seeds=args.ring_seeds,
            robust_seeds=args.robust_seeds,
            robust_first=args.robust_first,
            presets=args.presets,
            first_seed=args.first_seed,
        )
    result = table(store)
    (store / "table.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
