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

    python -m experiments.recipes tune   [--kimg 64] [--tuning-seed 0] [--methods ...] [--lr-factors 0.3333,1,3]
                                         [--concurrent 2] [--store DIR]
    python -m experiments.recipes report [--kimg 64] [--seeds 1000,1001,1002] [--store DIR]
    python -m experiments.recipes robust [--kimg 64] [--seeds 1000,1001,1002] [--store DIR]
    python -m experiments.recipes table  [--store DIR]

`stable_images`, untuned in a store, is reported as shipped (its settings are the
`r3gan_guarded` candidate's tuning result). `robust` runs each tuned method over a 10x lr range
about its chosen lr on the held-out seeds (how many runs converge). `--data digits` (all 1,797
real digits, one channel) or `digits180` (a seeded 180-image subset, scored against all 1,797
beside the score of a perfect copier of the 180) on a store's first command runs the whole
comparison on real digits.

Methods and their papers' learning rates: `METHODS`. The recipes' settings and sources:
configs/experiment/recipe_*.yaml and the README's recipe table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from experiments.common import ROOT, finished_runs, mean_sd, multirun
from experiments.mode_collapse import ray_cluster
from experiments.stacked_digits import real_row
from trainer.services import sweep_report


class Method(NamedTuple):
    preset: str
    lr: float  # its paper's learning rate for G and D
    settings: tuple[str, ...] = ()  # a candidate's overrides of its preset


METHODS = {
    "dcgan": Method("recipe_dcgan", 2e-4),
    "wgan_gp": Method("recipe_wgan_gp", 1e-4),
    "sngan": Method("recipe_sngan", 2e-4),
    "pacgan2": Method("recipe_pacgan2", 2e-4),
    "stylegan2": Method("recipe_stylegan2", 2.5e-3),
    "r3gan": Method("recipe_r3gan", 2e-4),
    "stable_images": Method("stable_images", 1.8e-3),  # ours, as shipped
    # a candidate for our preset: R3GAN's pieces, minibatch stddev, guarded
    "r3gan_guarded": Method("recipe_r3gan", 2e-4, ("model.mbstd_group=4", "stability=guarded")),
}
# Reported as shipped when not tuned in the store: the preset is r3gan_guarded's tuning result
SHIPPED = ("stable_images",)
CONVERGED = "eval/modes>=990"  # a stacked-digits run converged (robustness): 99 % of the modes
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


DATASETS = {  # --data: what make_shards writes (stacked digits as `data.builtin=stacked_digits` does)
    "stacked": ["source=stacked_digits", "channels=3", "num_samples=50000", "shard_size=3125"],
    "digits": ["source=digits", "channels=1"],  # all 1,797 real digits, one channel
    "digits180": ["source=digits", "channels=1", "fraction=0.1"],  # a seeded 10 % (180): small data
}

TITLES = {"stacked": "Stacked digits", "digits": "Real digits (1,797)", "digits180": "Real digits, 180"}
# A store whose evaluation is not its training set: the 180-digit subset is scored against all
# 1,797 digits (1,617 of them never seen), so a copy of the 180 cannot pass for the data.
EVAL_AGAINST = {"digits180": "digits"}


def dataset(store: Path, name: str | None = None) -> str:
    """The store's dataset: set by its first command, and a later command asking for another
    refused (a store's tuning and reports compare on one dataset)."""
    path = store / "dataset.txt"
    held = path.read_text().strip() if path.exists() else "stacked"  # stores from before --data
    if name is not None and name != held and (store / "best_configs.json").exists():
        raise SystemExit(f"--data {name}: {store} holds runs on {held}; give another --store")
    if name is not None:
        path.write_text(name + "\n")
        return name
    return held


def shards(store: Path, name: str | None = None) -> Path:
    """The store's dataset (or the named one) written once for every sweep and run, at 32 x 32."""
    name = name or dataset(store)
    out = store / "datasets" / ("stacked_digits-32px" if name == "stacked" else f"{name}-32px")
    if not (out / "manifest.json").exists():
        args = [*DATASETS[name], f"out={out}", "resolution=32"]
        subprocess.run([sys.executable, "-m", "data_pipeline.make_shards", *args], cwd=ROOT, check=True)
    return out


def data_args(store: Path) -> list[str]:
    """The training data and, where it differs (`EVAL_AGAINST`), the evaluation's."""
    against = EVAL_AGAINST.get(dataset(store))
    return [f"data.urls={shards(store)}"] + ([f"eval.urls={shards(store, against)}"] if against else [])


def steps_for(preset: str, kimg: float) -> tuple[int, int]:
    """(G steps, D steps per G step) that show D `kimg` thousand images at batch 64."""
    from trainer.services.compose import compose

    d_steps = compose([f"experiment={preset}", "model.resolution=32", "model.channels=3"]).optim.d_steps
    return max(1, round(kimg * 1000 / (64 * d_steps))), d_steps


def sweep(
    store: Path, method: str, preset: list[str], steps: int, space: str, tune: list[str], concurrent: int
) -> dict:
    """`trainer.tune` (FIFO, `--concurrent` trials at a time, ranked by in-training FD-digits at
    the last step) over `space` for one method; its summary lines as a dict ({} when it failed).
    Three trials at once on two cores leave no core idle while a grid's last trial runs alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args = [
        *preset,
        *data_args(store),
        *COMMON,
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={max(1, steps // 4)}",
        f"trainer.log_every={max(1, steps // 20)}",
        f"tune.space={{{space}}}",
        "tune.scheduler=fifo",
        "tune.metric=eval/fid",
        f"tune.max_concurrent={concurrent}",
        *tune,
        f"tune.storage_path={store / 'tune'}",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "tracking.experiment=recipes-tuning",
        f"cluster.num_cpus={concurrent}",  # Ray's logical CPUs: one per one-worker trial
    ]
    print(f"+ [{method}] python -m trainer.tune", " ".join(args), flush=True)
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "trainer.tune", *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    print(f"  exit {done.returncode}, {time.time() - t0:.0f} s", flush=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    print("\n".join(lines), flush=True)
    summary = dict(re.findall(r"^ *(\w+): (\S+)$", done.stdout, re.M))
    if done.returncode or "best_config" not in summary:
        print(done.stdout[-3000:] + done.stderr[-3000:], flush=True)
        return {}
    return summary


def grid(values: list[float]) -> str:
    return "grid(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def tune(
    store: Path, kimg: float, seed: int, methods: list[str], factors: list[float], concurrent: int
) -> None:
    """One sweep per method over its lr times each factor ({lr / 3, lr, 3 lr} by default) on the
    tuning seed, named by its factors (the same command resumes it; other factors add a sweep,
    e.g. one point beyond a best at the edge of the grid); the method's best over all its
    sweeps saved to best_configs.json."""
    best_path = store / "best_configs.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    for method in methods:
        preset, lr, settings = METHODS[method]
        steps, _ = steps_for(preset, kimg)
        space = f'optim.g_lr+optim.d_lr: "{grid([lr * f for f in factors])}"'
        name = f"recipes-{method}-x" + "-".join(f"{f:g}" for f in factors)
        sweep(
            store,
            method,
            [f"experiment={preset}", *settings, f"trainer.seed={seed}"],
            steps,
            space,
            [f"tune.name={name}"],
            concurrent,
        )
        if found := best_of(store, method):
            best[method] = found
            best_path.write_text(json.dumps(best, indent=1))


def method_sweeps(store: Path, method: str) -> list[Path]:
    """Every tuning sweep of `method` in the store (`recipes-METHOD-xFACTORS`; `recipes-METHOD`
    from before sweeps were named by their factors)."""
    own = (f"recipes-{method}", f"recipes-{method}-x")
    found = (store / "tune").glob(f"recipes-{method}*")
    return sorted(p for p in found if p.name == own[0] or p.name.startswith(own[1]))


def tuning_trials(store: Path, method: str) -> list[tuple[Path, dict]]:
    """(sweep, trials.csv row) of every trial of the method's sweeps, by lr."""
    rows = []
    for root in method_sweeps(store, method):
        if (root / "trials.csv").is_file():
            with open(root / "trials.csv") as f:
                rows += [(root, r) for r in csv.DictReader(f)]
    return sorted(rows, key=lambda pair: float(pair[1]["optim.g_lr+optim.d_lr"]))


def best_of(store: Path, method: str) -> str | None:
    """The best config over all the method's sweeps: that of the sweep holding the best trial,
    by the sweep's own rule (`best_row`) over their union."""
    from trainer.services.sweep import best_row

    best = best_row([{**typed(r), "sweep": root} for root, r in tuning_trials(store, method)], "eval/fid")
    configs = sorted((best["sweep"] / "experiment").glob("*.yaml")) if best else []
    return str(configs[0]) if configs else None


def typed(row: dict) -> dict:
    """A trials.csv row with its in-training metrics as numbers (empty: nan)."""
    return {k: float(v or "nan") if k.startswith("eval/") else v for k, v in row.items()}


def robust(store: Path, kimg: float, seeds: str, methods: list[str], concurrent: int) -> None:
    """Each tuned method over a 10x lr range about its chosen lr (/ sqrt 10, x 1, x sqrt 10) x
    the held-out seeds: how many runs converge (stacked digits: >= 990 modes at the last step)
    and the spread of FD-digits. Sweep folders saved to robust.json."""
    held_out(seeds)
    best = json.loads((store / "best_configs.json").read_text())
    path = store / "robust.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    from trainer.services.compose import compose

    for method in methods:
        if method not in best:
            print(f"  {method}: no tuned config in best_configs.json (run `tune` first)", flush=True)
            continue
        lr = compose([f"experiment={best[method]}"]).optim.g_lr
        space = f'optim.g_lr+optim.d_lr: "{grid([lr / 10**0.5, lr, lr * 10**0.5])}", '
        space += f'trainer.seed: "grid({seeds})"'
        converged = [f"tune.converged={CONVERGED}"] if dataset(store) == "stacked" else []
        steps, _ = steps_for(METHODS[method].preset, kimg)
        found = sweep(
            store,
            method,
            [f"experiment={best[method]}"],
            steps,
            space,
            [f"tune.name=recipes-robust-{method}", *converged],
            concurrent,
        )
        if found:
            done[method] = str(Path(found["robustness_report"]).parent)
            path.write_text(json.dumps(done, indent=1))


def held_out(seeds: str) -> None:
    if min(int(s) for s in seeds.split(",")) < 1000:
        raise SystemExit(f"--seeds {seeds}: held-out seeds are 1000 and up (tuning used lower ones)")


def report(store: Path, kimg: float, seeds: str, methods: list[str]) -> None:
    """Each method's tuned preset on the held-out seeds (Hydra multirun, two runs at a time on one
    Ray head), scored by the end-of-run evaluation into the store's `recipes` experiment."""
    held_out(seeds)
    best = json.loads((store / "best_configs.json").read_text())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # once: parallel runs race on a new sqlite schema
    if client.get_experiment_by_name("recipes") is None:
        client.create_experiment("recipes")
    with ray_cluster(store, 2) as cluster:
        env.update(cluster)
        for method in methods:
            config = best.get(method) or (METHODS[method].preset if method in SHIPPED else None)
            if config is None:
                print(f"  {method}: no tuned config in best_configs.json (run `tune` first)", flush=True)
                continue
            steps, _ = steps_for(METHODS[method].preset, kimg)
            args = [f"experiment={config}", *data_args(store), *COMMON, f"name={method}"]
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
        if "eval/fid" not in m:  # the end-of-run evaluation did not run
            continue
        out[(p["name"], int(p["trainer.seed"]))] = {
            "method": p["name"],
            "seed": int(p["trainer.seed"]),
            "lr": float(p["optim.g_lr"]),
            "steps": int(p["trainer.max_steps"]),
            "cpu_seconds": m.get("train_cpu_seconds", float("nan")),
            **trips(r),
            **{k: m.get(f"eval/{k}", float("nan")) for k in KEYS},
        }
    return list(out.values())


def trips(run) -> dict:
    """Whether the run was guarded and how often its guard rolled it back."""
    guarded = run.data.params.get("stability.guard.enabled") == "True"
    return {"guarded": guarded, "trips": int(float(run.data.tags.get("stablegan.guard.rollbacks", 0)))}


def trip_cell(runs: list[dict]) -> str:
    """`off`, or the guard's rollbacks over the runs (each trip in a healthy run a false alarm)."""
    if not any(r["guarded"] for r in runs):
        return "off"
    return f"{sum(r['trips'] for r in runs)} in {len(runs)} runs"


def guard_lines(store: Path) -> list[str]:
    """The guard's rollbacks over every guarded tuning and robustness trial, per sweep."""
    sweeps: dict[str, list[dict]] = {}
    for r in finished_runs(store, "recipes-tuning"):
        if "stablegan.sweep" in r.data.tags and "trainer.seed" in r.data.params:
            sweeps.setdefault(r.data.tags["stablegan.sweep"], []).append(trips(r))
    cells = [
        f"{name}: {trip_cell(runs)}"
        for name, runs in sorted(sweeps.items())
        if any(r["guarded"] for r in runs)
    ]
    return ["", "Guard rollbacks in the guarded sweeps' trials: " + "; ".join(cells)] if cells else []


def cell(values: list[float], key: str) -> str:
    """Mean ± sd (a lone value alone); mode counts as whole numbers; blank where not measured
    (mode counts on other data than stacked digits), `nan` where some run scored NaN."""
    if any(math.isnan(v) for v in values):
        return "" if all(math.isnan(v) for v in values) else "nan"
    if key != "modes":
        return mean_sd(values) if len(values) > 1 else f"{values[0]:.3g}"
    sd = f" ± {statistics.stdev(values):.0f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.0f}{sd}"


def cached_data_row(store: Path) -> dict:
    """The evaluation data's own row (`real_row`: half against half), scored once per store."""
    path = store / "data_row.json"
    if not path.exists():
        path.write_text(json.dumps(real_row(shards(store, EVAL_AGAINST.get(dataset(store))))))
    return json.loads(path.read_text())


def copier_row(store: Path) -> dict:
    """A store scored against other data than its training set (`EVAL_AGAINST`): its training
    images themselves scored as a generator's samples would be, i.e. a perfect copier. Cached."""
    from trainer.config import EvalConfig
    from trainer.eval import metrics
    from trainer.eval.evaluator import Evaluator

    path = store / "copier_row.json"
    if not path.exists():
        opts = EvalConfig(features="digits", num=20_000)
        against = Evaluator(str(shards(store, EVAL_AGAINST[dataset(store)])), opts, progress=False)
        copies = Evaluator(str(shards(store)), opts, progress=False)
        row = metrics.image_metrics(against.real, copies.real, opts.nearest_k, opts.seed, opts.kid_subsets)
        path.write_text(json.dumps(row))
    return json.loads(path.read_text())


def table(store: Path) -> dict:
    found, data_name = rows(store), dataset(store)
    seeds = sorted({r["seed"] for r in found})
    lines = [
        f"{TITLES[data_name]}, held-out seeds {seeds}; mean ± sd over seeds; lr tuned per method on the "
        "tuning seed over the grid in the tuning table below",
        "",
        "| method | lr | G steps | runs | >= 990 modes | modes | KL | FD-digits | recall | coverage "
        "| memorization | CPU s/run | guard trips |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if found:
        data = cached_data_row(store)
        lines.append(reference_line("real data (half vs half)", data))
        if data_name in EVAL_AGAINST:
            lines.append(
                reference_line("the training images themselves (a perfect copier)", copier_row(store))
            )
    for method in METHODS:
        sub = [r for r in found if r["method"] == method]
        if not sub:
            continue
        hit = f"{sum(r['modes'] >= 990 for r in sub)} of {len(sub)}" if data_name == "stacked" else "n/a"
        cells = " | ".join(cell([r[k] for r in sub], k) for k in KEYS)
        cpu = statistics.fmean(r["cpu_seconds"] for r in sub)
        lines.append(
            f"| {method} | {sub[0]['lr']:.3g} | {sub[0]['steps']} | {len(sub)} | {hit} | {cells} "
            f"| {cpu:.0f} | {trip_cell(sub)} |"
        )
    for name, modes, kl in PUBLISHED if data_name == "stacked" else []:
        lines.append(f"| {name} | | | | | {modes:.0f} | {kl} | | | | | | |")
    lines += tuning_lines(store) + robust_lines(store) + guard_lines(store)
    print("\n".join(lines))
    return {"rows": found, "seeds": seeds, "markdown": "\n".join(lines)}


def reference_line(label: str, row: dict) -> str:
    """A table line of data scored as a generator would be (mode counts: stacked digits only)."""
    cells = " | ".join(cell([row.get(k, math.nan)], k) for k in KEYS)
    return f"| {label} | | | | | {cells} | | |"


def tuning_lines(store: Path) -> list[str]:
    """Each method's tuning trials over all its sweeps: FD-digits at the last step per learning
    rate, and how each trial ended."""
    best_path = store / "best_configs.json"
    if not best_path.exists():
        return []
    out = [
        "",
        "Tuning (seed as given to `tune`; in-training FD-digits on 2,000 samples at the last step):",
        "",
    ]
    out += ["| method | lr: FD-digits (how it ended) |", "|---|---|"]
    for method in json.loads(best_path.read_text()):
        trials = [row for _, row in tuning_trials(store, method)]
        if not trials:  # not tuned here (a preset reported as shipped)
            continue
        cells = [
            f"{float(r['optim.g_lr+optim.d_lr']):.3g}: {float(r['eval/fid']):.1f} ({r['ended']})"
            for r in trials
        ]
        out.append(f"| {method} | {'; '.join(cells)} |")
    return out


def robust_lines(store: Path) -> list[str]:
    """Each method's robustness sweep (`robust`): over its lrs and seeds, how many runs converged
    and FD-digits' spread; then per lr."""
    path = store / "robust.json"
    if not path.exists():
        return []
    out = ["", "Robustness (lr over a 10x range about the chosen one x held-out seeds, each run judged at "]
    out[-1] += "its last step; in-training FD-digits on 2,000 samples):"
    out += [
        "",
        "| method | converged | FD-digits mean ± sd (min, max) | per lr: converged |",
        "|---|---|---|---|",
    ]
    condition = sweep_report.parse_condition(CONVERGED if dataset(store) == "stacked" else "")
    for method, root in json.loads(path.read_text()).items():
        with open(Path(root) / "trials.csv") as f:
            trials = list(csv.DictReader(f))
        ok = [r for r in trials if converged_row(r, condition)]
        fds = [float(r["eval/fid"]) for r in trials if r["ended"] == "completed" and r["eval/fid"]]
        spread = f"{mean_sd(fds)} ({min(fds):.3g}, {max(fds):.3g})" if fds else "n/a"
        per_lr: dict[float, list[bool]] = {}
        for r in trials:
            per_lr.setdefault(float(r["optim.g_lr+optim.d_lr"]), []).append(converged_row(r, condition))
        cells = "; ".join(f"{lr:.3g}: {sum(v)} of {len(v)}" for lr, v in sorted(per_lr.items()))
        out.append(f"| {method} | {len(ok)} of {len(trials)} | {spread} | {cells} |")
    return out


def converged_row(row: dict, condition: tuple[str, str, float] | None) -> bool:
    """A robustness trial (a trials.csv row) converged, by the sweep's own rule."""
    return sweep_report.converged(typed(row), condition)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["tune", "report", "robust", "table"])
    ap.add_argument("--kimg", type=float, default=64.0, help="images shown to D per run, thousands")
    ap.add_argument("--tuning-seed", type=int, default=0)
    ap.add_argument("--lr-factors", default="0.3333,1,3", help="tune: each method's lr times these")
    ap.add_argument("--seeds", default="1000,1001,1002", help="held-out seeds for the report")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--data", choices=list(DATASETS), help="the store's dataset (default: stacked)")
    ap.add_argument("--concurrent", type=int, default=2, help="tune, robust: trials at once")
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "recipes"))
    args = ap.parse_args()
    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    dataset(store, args.data)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.command == "tune":
        factors = [float(f) for f in args.lr_factors.split(",")]
        tune(store, args.kimg, args.tuning_seed, methods, factors, args.concurrent)
        return
    if args.command == "report":
        report(store, args.kimg, args.seeds, methods)
    if args.command == "robust":
        robust(store, args.kimg, args.seeds, methods, args.concurrent)
    result = table(store)
    (store / "table.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
