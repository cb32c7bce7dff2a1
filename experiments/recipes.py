"""The field's recipes and our preset side by side at equal compute on stacked digits (1,000 modes).

Every method gets the same tuning budget and the same images: its published learning rate and a
third and three times it (G's and D's together), one `stablegan tune` sweep each on the tuning
seed (FIFO: every trial runs its whole budget and is ranked at its last step, so a run that
diverges after its best point loses), scored by in-training FD-digits. The best setting of each
method (the sweep's `best_config` preset) then trains on held-out seeds, scored by the end-of-run
evaluation (FD-digits, KID, precision / recall / density / coverage and memorization on 10,000
samples; modes and KL on 26,000), beside the real data's own row and the published rows.

Compute: the budget is images shown to D (`--kimg`), as StyleGAN counts it, so a recipe with
5 D steps per G step (WGAN-GP, SNGAN) gets a fifth of the G steps; CPU seconds per run are
in the table.

    python -m experiments.recipes tune   [--kimg 64] [--tuning-seed 0] [--methods ...] [--store DIR]
    python -m experiments.recipes report [--kimg 64] [--seeds 1000,1001,1002] [--store DIR]
    python -m experiments.recipes table  [--store DIR]

Methods and their papers' learning rates: `METHODS`. The recipes' settings and sources:
configs/experiment/recipe_*.yaml and the README's recipe table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import ROOT, finished_runs, mean_sd, multirun
from experiments.mode_collapse import ray_cluster
from experiments.stacked_digits import real_row

# method -> (preset, its paper's learning rate for G and D)
METHODS = {
    "dcgan": ("recipe_dcgan", 2e-4),
    "wgan_gp": ("recipe_wgan_gp", 1e-4),
    "sngan": ("recipe_sngan", 2e-4),
    "pacgan2": ("recipe_pacgan2", 2e-4),
    "stylegan2": ("recipe_stylegan2", 2.5e-3),
    "r3gan": ("recipe_r3gan", 2e-4),
    "stable_images": ("stable_images", 2e-4),  # ours, as shipped
    "r3gan_guarded": ("recipe_r3gan", 2e-4),  # a candidate for our preset: R3GAN's pieces, guarded
}
EXTRA = {  # a candidate's settings over its preset's
    "r3gan_guarded": ["model.mbstd_group=4", "stability=guarded"],
}
COMMON = [  # beside data.urls (`shards`)
    "data.batch_size=64",
    "tracking.register=false",
    "trainer.sample_every=0",
    "data.loader_workers=1",
    "eval.features=digits",
]
PUBLISHED = [  # PacGAN (Lin et al. 2018) Table 3, Stacked MNIST, 26,000 samples; ~100,000 iterations of 64
    ("DCGAN (PacGAN Table 3)", 99.0, 3.40),
    ("PacDCGAN2 (PacGAN Table 3)", 1000.0, 0.06),
]
KEYS = ("modes", "mode_kl", "fid", "recall", "coverage", "memorization")


def shards(store: Path) -> Path:
    """Stacked digits written once for every sweep and run (what `data.builtin=stacked_digits`
    writes: the same source, size and shard layout)."""
    out = store / "datasets" / "stacked_digits-32px"
    if not (out / "manifest.json").exists():
        args = ["source=stacked_digits", f"out={out}", "resolution=32", "channels=3"]
        args += ["num_samples=50000", "shard_size=3125"]
        subprocess.run([sys.executable, "-m", "data_pipeline.make_shards", *args], cwd=ROOT, check=True)
    return out


def steps_for(preset: str, kimg: float) -> tuple[int, int]:
    """(G steps, D steps per G step) that show D `kimg` thousand images at batch 64."""
    from trainer.services.compose import compose

    d_steps = compose([f"experiment={preset}", "model.resolution=32", "model.channels=3"]).optim.d_steps
    return max(1, round(kimg * 1000 / (64 * d_steps))), d_steps


def tune(store: Path, kimg: float, seed: int, methods: list[str], factors: list[float]) -> None:
    """One FIFO sweep per method over its lr times each factor ({lr / 3, lr, 3 lr} by default) on
    the tuning seed; its best config path saved to best_configs.json."""
    best_path = store / "best_configs.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    for method in methods:
        preset, lr = METHODS[method]
        steps, _ = steps_for(preset, kimg)
        grid = ", ".join(f"{lr * f:.3g}" for f in factors)
        args = [
            f"experiment={preset}",
            *EXTRA.get(method, []),
            f"data.urls={shards(store)}",
            *COMMON,
            f"trainer.max_steps={steps}",
            f"trainer.checkpoint_every={max(1, steps // 4)}",
            f"trainer.log_every={max(1, steps // 20)}",
            f"trainer.seed={seed}",
            f'tune.space={{optim.g_lr+optim.d_lr: "grid({grid})"}}',
            "tune.scheduler=fifo",
            "tune.metric=eval/fid",
            "tune.max_concurrent=2",
            f"tune.name=recipes-{method}",
            f"tune.storage_path={store / 'tune'}",
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
            "tracking.experiment=recipes-tuning",
            "cluster.num_cpus=2",
        ]
        print(f"+ [{method}] python -m trainer.tune", " ".join(args), flush=True)
        t0 = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "trainer.tune", *args], env=env, cwd=ROOT, capture_output=True, text=True
        )
        found = re.search(r"best_config: (\S+)", done.stdout)
        print(f"  exit {done.returncode}, {time.time() - t0:.0f} s", flush=True)
        print("\n".join(line for line in done.stdout.splitlines() if line.startswith("  ")), flush=True)
        if done.returncode or not found:
            print(done.stdout[-3000:] + done.stderr[-3000:], flush=True)
            continue
        best[method] = found.group(1)
        best_path.write_text(json.dumps(best, indent=1))


def report(store: Path, kimg: float, seeds: str, methods: list[str]) -> None:
    """Each method's tuned preset on the held-out seeds (Hydra multirun, two runs at a time on one
    Ray head), scored by the end-of-run evaluation into the store's `recipes` experiment."""
    best = json.loads((store / "best_configs.json").read_text())
    if min(int(s) for s in seeds.split(",")) < 1000:
        raise SystemExit(f"--seeds {seeds}: held-out seeds are 1000 and up (tuning used lower ones)")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # once: parallel runs race on a new sqlite schema
    if client.get_experiment_by_name("recipes") is None:
        client.create_experiment("recipes")
    with ray_cluster(store, 2) as cluster:
        env.update(cluster)
        for method in methods:
            if method not in best:
                print(f"  {method}: no tuned config in best_configs.json (run `tune` first)", flush=True)
                continue
            steps, _ = steps_for(METHODS[method][0], kimg)
            args = [f"experiment={best[method]}", f"data.urls={shards(store)}", *COMMON, f"name={method}"]
            args += [f"trainer.seed={seeds}", f"trainer.max_steps={steps}", "tracking.experiment=recipes"]
            args += [
                f"trainer.checkpoint_every={max(1, steps // 4)}",
                f"trainer.log_every={max(1, steps // 20)}",
            ]
            multirun(store, method, [*args, "eval.every=0"], env, jobs=2)


def rows(store: Path) -> list[dict]:
    out: dict[tuple[str, int], dict] = {}  # a rerun of (method, seed) replaces the older run
    for r in finished_runs(store, "recipes"):
        m, p = r.data.metrics, r.data.params
        if "eval/modes" not in m:
            continue
        out[(p["name"], int(p["trainer.seed"]))] = {
            "method": p["name"],
            "seed": int(p["trainer.seed"]),
            "lr": float(p["optim.g_lr"]),
            "steps": int(p["trainer.max_steps"]),
            "cpu_seconds": m.get("train_cpu_seconds", float("nan")),
            **{k: m.get(f"eval/{k}", float("nan")) for k in KEYS},
        }
    return list(out.values())


def cell(values: list[float], key: str) -> str:
    """Mean ± sd (a lone value alone); mode counts as whole numbers."""
    if key != "modes":
        return mean_sd(values) if len(values) > 1 else f"{values[0]:.3g}"
    sd = f" ± {statistics.stdev(values):.0f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.0f}{sd}"


def cached_data_row(store: Path) -> dict:
    """The real data's row (`real_row`), scored once per store."""
    path = store / "data_row.json"
    if not path.exists():
        path.write_text(json.dumps(real_row(shards(store))))
    return json.loads(path.read_text())


def table(store: Path) -> dict:
    found = rows(store)
    seeds = sorted({r["seed"] for r in found})
    lines = [
        f"Stacked digits, held-out seeds {seeds}; mean ± sd over seeds; lr tuned per method on the "
        "tuning seed over the grid in the tuning table below",
        "",
        "| method | lr | G steps | runs | >= 990 modes | modes | KL | FD-digits | recall | coverage "
        "| memorization | CPU s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if found:
        data = cached_data_row(store)
        lines.append(
            "| real data (half vs half) | | | | | " + " | ".join(cell([data[k]], k) for k in KEYS) + " | |"
        )
    for method in METHODS:
        sub = [r for r in found if r["method"] == method]
        if not sub:
            continue
        hit = sum(r["modes"] >= 990 for r in sub)
        cells = " | ".join(cell([r[k] for r in sub], k) for k in KEYS)
        cpu = statistics.fmean(r["cpu_seconds"] for r in sub)
        lines.append(
            f"| {method} | {sub[0]['lr']:.3g} | {sub[0]['steps']} | {len(sub)} | {hit} of {len(sub)} | {cells} "
            f"| {cpu:.0f} |"
        )
    for name, modes, kl in PUBLISHED:
        lines.append(f"| {name} | | | | | {modes:.0f} | {kl} | | | | | |")
    lines += tuning_lines(store)
    print("\n".join(lines))
    return {"rows": found, "seeds": seeds, "markdown": "\n".join(lines)}


def tuning_lines(store: Path) -> list[str]:
    """Each method's tuning sweep (its trials.csv beside the best config): FD-digits at the last
    step per learning rate, and how each trial ended."""
    best_path = store / "best_configs.json"
    if not best_path.exists():
        return []
    out = [
        "",
        "Tuning (seed as given to `tune`; in-training FD-digits on 2,000 samples at the last step):",
        "",
    ]
    out += ["| method | lr: FD-digits (how it ended) |", "|---|---|"]
    for method, config in json.loads(best_path.read_text()).items():
        with open(Path(config).parent.parent / "trials.csv") as f:
            trials = sorted(csv.DictReader(f), key=lambda r: float(r["optim.g_lr+optim.d_lr"]))
        cells = [
            f"{float(r['optim.g_lr+optim.d_lr']):.3g}: {float(r['eval/fid']):.1f} ({r['ended']})"
            for r in trials
        ]
        out.append(f"| {method} | {'; '.join(cells)} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["tune", "report", "table"])
    ap.add_argument("--kimg", type=float, default=64.0, help="images shown to D per run, thousands")
    ap.add_argument("--tuning-seed", type=int, default=0)
    ap.add_argument("--lr-factors", default="0.3333,1,3", help="tune: each method's lr times these")
    ap.add_argument("--seeds", default="1000,1001,1002", help="held-out seeds for the report")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "recipes"))
    args = ap.parse_args()
    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.command == "tune":
        factors = [float(f) for f in args.lr_factors.split(",")]
        tune(store, args.kimg, args.tuning_seed, methods, factors)
        return
    if args.command == "report":
        report(store, args.kimg, args.seeds, methods)
    result = table(store)
    (store / "table.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
