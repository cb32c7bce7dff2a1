"""A sweep on Ray Tune: one composed config, a search space (`tune.space`), and every trial a
whole stablegan run (its own Ray Train worker group, checkpoints, in-training evaluation,
guard), as many at once as the cluster fits.

    run_sweep(cfg) = plan (space checked, data prepared once, parent MLflow run)
                     -> Tuner.fit (ASHA, FIFO or PBT; a diverged trial stopped at once;
                        each trial in trainer/services/trial.py)
                     -> table, robustness report and picture (sweep_report.py), best config,
                        the best generator registered

Trials are ranked at their last step only: a trial stopped early or diverged is no candidate,
whatever it scored before (a GAN's best at step 2,000 can blow up by 2,500).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.stopper import FunctionStopper

from trainer.config import Config, TuneConfig
from trainer.services import sweep_report as report
from trainer.services import tracking
from trainer.services.compose import compose
from trainer.services.conclude import evaluate_final, register_saved
from trainer.services.driver import init_ray
from trainer.services.plan import prepare
from trainer.services.space import grid_points, parse_space, with_values
from trainer.services.trial import RUNG, SWEEP_TAG, SweepSpec, run_trial

REGISTERED_TAG = "stablegan.sweep_registered"
# A trial's own settings and the machine's (where it tracks, which cluster): the best config
# leaves them out.
TRIAL_ONLY = ("tune", "trainer.run_name", "trainer.storage_path", "tracking.uri", "cluster")
# A trial's own process only waits on its Ray Train run, which asks for the CPUs itself; Tune
# wants some resource per trial, so it takes a token of memory (bytes), not a CPU.
TRIAL_DRIVER = {"memory": 1 << 20}


def run_sweep(cfg: Config) -> dict[str, str]:
    """Search `cfg.tune.space` over runs of `cfg`; returns where the results are."""
    spec = plan_sweep(cfg)
    grid = make_tuner(spec, cfg).fit()
    rows = table(grid, spec, cfg.trainer.max_steps)
    return conclude_sweep(spec, rows, cfg)


def plan_sweep(cfg: Config) -> SweepSpec:
    """The checked sweep: a bad key or range fails before Ray or MLflow start."""
    dims = tuple(parse_space(cfg.tune.space, cfg))
    report.parse_condition(cfg.tune.converged)  # a bad condition fails here, not after the sweep
    name = cfg.tune.name or f"tune-{cfg.name}"
    root = (Path(cfg.tune.storage_path).expanduser() / name).resolve()
    trial_cfg = for_trials(cfg, root)
    plan = prepare(replace(trial_cfg, trainer=replace(trial_cfg.trainer, run_name=f"{name}-data")))
    base = plan.config_dict()
    base["data"]["urls"] = plan.data_urls  # the built-in shards, written once for every trial
    init_ray(cfg)
    params = {"tune": asdict(cfg.tune), "experiment": cfg.name}
    parent, _ = tracking.start_run(
        plan.tracking_uri, cfg.tracking.experiment, name, params, cfg.tracking.artifact_location
    )
    tracking.set_run_tags(plan.tracking_uri, parent, {SWEEP_TAG: name})
    return SweepSpec(name, str(root), base, dims, metric_of(cfg), parent, plan.tracking_uri)


def for_trials(cfg: Config, root: Path) -> Config:
    """A trial's config: evaluated in training at every checkpoint (what the scheduler ranks),
    with no separate final evaluation and no registration (the sweep registers its best)."""
    t, e = cfg.trainer, cfg.eval
    every = e.every if e.every and t.checkpoint_every % e.every == 0 else t.checkpoint_every
    # A leader's run checkpoint must outlive the moment a trial copies it over (PBT).
    keep = max(t.keep_checkpoints, 4) if cfg.tune.scheduler == "pbt" else t.keep_checkpoints
    return replace(
        cfg,
        eval=replace(e, every=every, at_end=False),
        tracking=replace(cfg.tracking, register=False),
        trainer=replace(t, storage_path=str(root / "trials"), keep_checkpoints=keep),
    )


def metric_of(cfg: Config) -> str:
    if cfg.tune.metric != "auto":
        return cfg.tune.metric
    return "eval/mmd" if cfg.model.arch == "mlp" else "eval/fid"


def make_tuner(spec: SweepSpec, cfg: Config) -> tune.Tuner:
    """A new Tuner, or the stopped sweep of the same name restored (finished trials kept)."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), TRIAL_DRIVER)
    state = os.path.join(spec.root, "tuner")
    if tune.Tuner.can_restore(state):
        print(f"stablegan tune: resuming sweep {spec.name} from {state}")
        return tune.Tuner.restore(state, trainable, resume_unfinished=True, resume_errored=True)
    t = cfg.tune
    return tune.Tuner(
        trainable,
        param_space={d.key: d.domain() for d in spec.dims},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode="min",
            num_samples=t.num_samples,
            scheduler=scheduler(cfg, spec.dims),
            # The limit goes to the generator: Tune ignores max_concurrent_trials beside one.
            search_alg=searcher(t, spec.dims, t.max_concurrent or fitting_trials(cfg)),
        ),
        run_config=tune.RunConfig(
            name="tuner",
            storage_path=spec.root,
            stop=FunctionStopper(lambda _trial, result: result.get("diverged", 0.0) > 0),
            # No CheckpointConfig: Tune's checkpoints here are pointers of a few bytes to run
            # checkpoints, all kept, so population-based training finds a leader's when it exploits.
            verbose=1,
        ),
    )


def searcher(t: TuneConfig, dims: tuple, max_concurrent: int) -> BasicVariantGenerator:
    """Tune's variant generator: every grid point `num_samples` times (shuffled unless
    `tune.shuffle=false`), the other dimensions drawn from `tune.seed`."""
    points = grid_points(dims, t.num_samples, t.seed) if t.shuffle else None
    return BasicVariantGenerator(
        points_to_evaluate=points, random_state=t.seed, max_concurrent=max_concurrent
    )


def scheduler(cfg: Config, dims: tuple) -> FIFOScheduler | ASHAScheduler | PopulationBasedTraining:
    t, steps = cfg.tune, cfg.trainer.max_steps
    if t.scheduler == "fifo":
        return FIFOScheduler()
    if t.scheduler == "pbt":
        # Every `perturbation_steps` a trial in the bottom quarter takes a top-quarter trial's
        # checkpoint over and perturbs the searched settings (x0.8 / x1.2, or a new draw).
        return PopulationBasedTraining(
            time_attr=RUNG,
            perturbation_interval=t.perturbation_steps or max(1, steps // 4),
            hyperparam_mutations={d.key: d.mutation() for d in dims},
            quantile_fraction=0.25,
            resample_probability=0.25,
            require_attrs=False,  # a trial's last report carries no rung_step
        )
    return ASHAScheduler(
        time_attr=RUNG,
        max_t=steps,
        grace_period=t.grace_steps or max(1, steps // 4),
        reduction_factor=t.reduction_factor,
    )


def fitting_trials(cfg: Config) -> int:
    """How many trials' worker groups the connected cluster's CPUs hold at once."""
    t = cfg.trainer
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // (t.num_workers * t.cpus_per_worker))


def table(grid: tune.ResultGrid, spec: SweepSpec, max_steps: int) -> list[dict]:
    """One row per trial: its settings, last step, its in-training metrics there, how it ended."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        step = int(m.get("step", 0))
        ended = "completed" if step >= max_steps else "stopped early"
        if m.get("diverged", 0.0) > 0:
            ended = "diverged"
        elif result.error is not None:
            ended = "failed"
        value = float(m.get(spec.metric, math.nan))
        trial = m.get("trial_id") or Path(result.path).name
        evals = {k: float(v) for k, v in m.items() if k.startswith("eval/")}
        row = {"trial": trial, **result.config, "step": step, **evals, spec.metric: value, "ended": ended}
        rows.append(row | {"node": m.get("node", "")})  # where rank 0 of its last run trained
    return sorted(rows, key=lambda r: (r["ended"] != "completed", _score(r, spec.metric)))


def _score(row: dict, metric: str) -> float:
    value = row[metric]
    return value if math.isfinite(value) else math.inf


def best_row(rows: list[dict], metric: str) -> dict | None:
    """The best trial that ran to its last step without diverging (None if none did)."""
    done = [r for r in rows if r["ended"] == "completed" and math.isfinite(r[metric])]
    return min(done, key=lambda r: r[metric]) if done else None


def conclude_sweep(spec: SweepSpec, rows: list[dict], cfg: Config) -> dict[str, str]:
    """The table, robustness report and picture, and the best config, written and logged to
    the parent run; every trial's MLflow run marked with how it ended; the best trial's
    generator registered as a candidate."""
    root, condition = Path(spec.root), report.parse_condition(cfg.tune.converged)
    runs = tracking.child_runs(spec.tracking_uri, cfg.tracking.experiment, spec.parent_run_id)
    last = final_runs(runs)
    settle_from_runs(rows, last, cfg.trainer.max_steps, spec.metric)
    out = {"sweep": spec.name, "mlflow_run_id": spec.parent_run_id} | report.summary(
        rows, spec.metric, condition
    )
    end_children(spec, runs, last, rows)
    add_lineage(rows, last)
    metrics = [spec.metric] + ([condition[0]] if condition and condition[0] != spec.metric else [])
    files = [
        report.write_table(rows, spec.keys, metrics, root),
        report.write_report(rows, spec.keys, spec.metric, condition, root, spec.name),
        report.write_picture(
            rows, spec.keys, {d.key for d in spec.dims if d.log_scale()}, spec.metric, root, spec.name
        ),
    ]
    out |= {"table": str(files[0]), "robustness_report": str(files[1]), "robustness_picture": str(files[2])}
    best = best_row(rows, spec.metric)
    if best is not None:
        best_cfg = with_values(asdict(cfg), {k: best[k] for k in spec.keys})
        out["best"] = f"trial {best['trial']}: {spec.metric} {best[spec.metric]:.4g} with " + ", ".join(
            f"{k}={best[k]:.4g}" if isinstance(best[k], float) else f"{k}={best[k]}" for k in spec.keys
        )
        out["best_config"] = str(write_best_config(best_cfg, root, spec, best))
        files.append(Path(out["best_config"]))
        if cfg.tracking.register:
            out["registered_model"] = register_once(spec, best_cfg, last[best["trial"]])
    tracking.log_files(spec.tracking_uri, spec.parent_run_id, files, "sweep")
    tracking.end_run(
        spec.tracking_uri, spec.parent_run_id, tags={"stablegan.sweep_best": out.get("best", "none")}
    )
    return out


def final_runs(runs: list[dict]) -> dict[str, dict]:
    """Each trial's last MLflow run of the sweep's `runs` (a trial that took a leader's
    checkpoint over has more than one)."""
    return {r["tags"].get("stablegan.trial", ""): r for r in runs}  # oldest first: the last wins


def settle_from_runs(rows: list[dict], last: dict[str, dict], max_steps: int, metric: str) -> None:
    """A row Tune last saw before its trial's end whose final run still finished takes that
    run's end: population-based training pauses a leader while a laggard takes its checkpoint
    over, and the leader's run goes on to its last step after Tune's last result. A finished
    run concluded after its last step (a stopped trial's run never concludes), and its latest
    in-training evaluation is the one at that step."""
    for row in rows:
        run = last.get(row["trial"])
        if row["ended"] == "stopped early" and run is not None and run["status"] == "FINISHED":
            evals = {k: v for k, v in run["metrics"].items() if k.startswith("eval/")}
            row |= evals | {"step": max_steps, "ended": "completed"}
    rows.sort(key=lambda r: (r["ended"] != "completed", _score(r, metric)))


def end_children(spec: SweepSpec, runs: list[dict], last: dict[str, dict], rows: list[dict]) -> None:
    """Every trial's MLflow run tagged with how it ended; one Tune stopped (early, or diverged)
    is ended as KILLED, whatever its interrupted run managed to record, and so is a run whose
    trial went on from another trial's checkpoint."""
    ended = {r["trial"]: r["ended"] for r in rows}
    last_ids = {r["id"] for r in last.values()}
    for run in runs:
        why = ended.get(run["tags"].get("stablegan.trial", ""), "")
        if run["id"] not in last_ids:
            why = "handed over to another trial's checkpoint (population-based training)"
        if why and run["status"] != "FINISHED":
            final = "FAILED" if why == "failed" else "KILLED"
            tracking.end_run(spec.tracking_uri, run["id"], status=final, tags={"stablegan.sweep_end": why})
        elif why:
            tracking.set_run_tags(spec.tracking_uri, run["id"], {"stablegan.sweep_end": why})


def add_lineage(rows: list[dict], last: dict[str, dict]) -> None:
    """Each row's `lineage`: the trials (and steps) its final weights were taken over from."""
    for row in rows:
        chain = json.loads(last.get(row["trial"], {}).get("tags", {}).get("stablegan.lineage", "[]"))
        row["lineage"] = " > ".join(f"{link['trial']}@{link['step']}" for link in chain)


def write_best_config(best: Config, root: Path, spec: SweepSpec, row: dict) -> Path:
    """The best trial's settings as an experiment preset, for `experiment=PATH`: what differs
    from what a preset is composed over (the schema's defaults and the root config's default
    groups). Composed back, it must give the trial's settings; the shards stay the user's."""
    folder = root / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.yaml"
    values = changed(asdict(best), preset_base(folder)) | {"name": f"{spec.name}-best"}
    header = (
        f"# @package _global_\n# The best trial ({row['trial']}) of sweep {spec.name}: {spec.metric} "
        f"{row[spec.metric]:.4g} at step {row['step']}.\n# Train it: stablegan train experiment={path}\n"
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(values)))
    again = changed(asdict(compose([f"experiment={path}"])), asdict(best))
    if set(again) - {"name"}:
        raise RuntimeError(f"{path} composes to other settings than the best trial's: {again}")
    return path


def preset_base(folder: Path) -> dict:
    """What `experiment=PRESET` composes to before the preset's own values."""
    empty = folder / "_empty.yaml"
    empty.write_text("# @package _global_\n")
    try:
        return asdict(compose([f"experiment={empty}"]))
    finally:
        empty.unlink()


def changed(values: dict, defaults: dict, prefix: str = "") -> dict:
    """The nested entries of `values` that differ from `defaults` (a trial's own keys left out)."""
    out: dict = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in TRIAL_ONLY:
            continue
        if (
            isinstance(value, dict)
            and isinstance(defaults.get(key), dict)
            and value
            and defaults[key] is not None
        ):
            sub = changed(value, defaults[key], f"{dotted}.")
            if sub:
                out[key] = sub
        elif value != defaults.get(key):
            out[key] = value
    return out


def register_once(spec: SweepSpec, best: Config, run: dict) -> str:
    """`register_best`, unless this sweep registered already (its finished state restored)."""
    done = tracking.run_tags(spec.tracking_uri, spec.parent_run_id).get(REGISTERED_TAG)
    if done:
        return f"{done} (registered when the sweep first finished)"
    registered = register_best(spec, best, run)
    tracking.set_run_tags(spec.tracking_uri, spec.parent_run_id, {REGISTERED_TAG: registered})
    return registered


def register_best(spec: SweepSpec, best: Config, run: dict) -> str:
    """The best trial's EMA generator (its final MLflow `run`'s) registered through the same
    gate as any run's: evaluated at the end as a run is, with its stability flags, put to
    promotion."""
    run_id = run["id"]
    weights = Path(spec.root) / "trials" / run["name"] / "generator_ema.pt"
    flags_tag = run["tags"].get("stablegan.stability_flags")
    flags = None if flags_tag is None else tuple(f for f in flags_tag.split(",") if f)
    urls = spec.base["data"]["urls"]
    evaluation = evaluate_final(best, weights, best.eval.urls or urls)
    model_uri, decision = register_saved(
        weights, best, run_id, spec.tracking_uri, str(urls), evaluation, flags
    )
    return f"{model_uri} ({decision})"


__all__ = ["SweepSpec", "best_row", "changed", "plan_sweep", "run_sweep"]
