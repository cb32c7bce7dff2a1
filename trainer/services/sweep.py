"""A sweep on Ray Tune: one composed config, a search space (`tune.space`), and every trial a
whole stablegan run (its own Ray Train worker group, checkpoints, in-training evaluation,
guard), as many at once as the cluster fits.

    run_sweep(cfg) = plan (space checked, data prepared once, parent MLflow run)
                     -> Tuner.fit (ASHA or FIFO; a diverged trial stopped at once)
                     -> table, robustness picture, best config, the best generator registered

Trials are ranked at their last step only: a trial stopped early or diverged is no candidate,
whatever it scored before (a GAN's best at step 2,000 can blow up by 2,500).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.stopper import FunctionStopper

from trainer.config import Config
from trainer.services import tracking
from trainer.services.conclude import conclude, evaluate_final, register_saved
from trainer.services.driver import fit, init_ray, open_tracking
from trainer.services.plan import prepare
from trainer.services.space import Dimension, parse_space, with_values
from trainer.train import plots

SWEEP_TAG = "stablegan.sweep"
REGISTERED_TAG = "stablegan.sweep_registered"
# A trial's own settings and the machine's (where it tracks, which cluster): the best config
# leaves them out.
TRIAL_ONLY = ("tune", "trainer.run_name", "trainer.storage_path", "tracking.uri", "cluster")
# A trial's own process only waits on its Ray Train run, which asks for the CPUs itself; Tune
# wants some resource per trial, so it takes a token of memory (bytes), not a CPU.
TRIAL_DRIVER = {"memory": 1 << 20}


@dataclass(frozen=True)
class SweepSpec:
    """What every trial of a sweep shares; travels to the trial actors."""

    name: str
    root: str  # the sweep's folder: Tune's state, the trials' runs, the outputs
    base: dict  # the trials' config (data resolved once, evaluated in training at each checkpoint)
    dims: tuple[Dimension, ...]
    metric: str
    parent_run_id: str
    tracking_uri: str

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]


def run_sweep(cfg: Config) -> dict[str, str]:
    """Search `cfg.tune.space` over runs of `cfg`; returns where the results are."""
    spec = plan_sweep(cfg)
    grid = make_tuner(spec, cfg).fit()
    rows = table(grid, spec, cfg.trainer.max_steps)
    return conclude_sweep(spec, rows, cfg)


def plan_sweep(cfg: Config) -> SweepSpec:
    """The checked sweep: a bad key or range fails before Ray or MLflow start."""
    dims = tuple(parse_space(cfg.tune.space, cfg))
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
    return replace(
        cfg,
        eval=replace(e, every=every, at_end=False),
        tracking=replace(cfg.tracking, register=False),
        trainer=replace(t, storage_path=str(root / "trials")),
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
            max_concurrent_trials=t.max_concurrent or fitting_trials(cfg),
            scheduler=scheduler(cfg),
        ),
        run_config=tune.RunConfig(
            name="tuner",
            storage_path=spec.root,
            stop=FunctionStopper(lambda _trial, result: result.get("diverged", 0.0) > 0),
            verbose=1,
        ),
    )


def scheduler(cfg: Config) -> FIFOScheduler | ASHAScheduler:
    t, steps = cfg.tune, cfg.trainer.max_steps
    if t.scheduler == "fifo":
        return FIFOScheduler()
    # ASHA stops a trial that reaches max_t at once, before its run concludes (weights saved,
    # MLflow run ended): one step beyond the last, so it stops only the trials it judges.
    return ASHAScheduler(
        time_attr="step",
        max_t=steps + 1,
        grace_period=t.grace_steps or max(1, steps // 4),
        reduction_factor=t.reduction_factor,
    )


def fitting_trials(cfg: Config) -> int:
    """How many trials' worker groups the connected cluster's CPUs hold at once."""
    t = cfg.trainer
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // (t.num_workers * t.cpus_per_worker))


def run_trial(params: dict, spec: SweepSpec) -> None:
    """One trial: a whole run of the sweep's config with `params` set, tracked as a child of
    the sweep's MLflow run; its checkpoints' reports reach Tune's scheduler."""
    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(spec.base, params)
    cfg = replace(cfg, trainer=replace(cfg.trainer, run_name=f"{spec.name}-{trial_id}"))
    plan = prepare(cfg)  # a restored trial finds its own checkpoint here and resumes from it
    run_id = open_tracking(plan)
    tags = {"mlflow.parentRunId": spec.parent_run_id, SWEEP_TAG: spec.name, "stablegan.trial": trial_id}
    tracking.set_run_tags(plan.tracking_uri, run_id, tags | {f"tune.{k}": v for k, v in params.items()})
    result = fit(plan, run_id, callbacks=[TuneReportCallback()])
    conclude(plan, result.checkpoint, result.metrics or {}, run_id)


def table(grid: tune.ResultGrid, spec: SweepSpec, max_steps: int) -> list[dict]:
    """One row per trial: its settings, last step and metric, and how it ended."""
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
        rows.append({"trial": trial, **result.config, "step": step, spec.metric: value, "ended": ended})
    return sorted(rows, key=lambda r: (r["ended"] != "completed", _score(r, spec.metric)))


def _score(row: dict, metric: str) -> float:
    value = row[metric]
    return value if math.isfinite(value) else math.inf


def best_row(rows: list[dict], metric: str) -> dict | None:
    """The best trial that ran to its last step without diverging (None if none did)."""
    done = [r for r in rows if r["ended"] == "completed" and math.isfinite(r[metric])]
    return min(done, key=lambda r: r[metric]) if done else None


def conclude_sweep(spec: SweepSpec, rows: list[dict], cfg: Config) -> dict[str, str]:
    """The table, picture and best config written and logged to the parent run; trials that
    did not finish marked in MLflow; the best trial's generator registered as a candidate."""
    root = Path(spec.root)
    out = {"sweep": spec.name, "mlflow_run_id": spec.parent_run_id} | write_table(rows, spec, root)
    picture = root / "robustness.png"
    log_keys = {d.key for d in spec.dims if d.log_scale()}
    picture.write_bytes(plots.sweep_png(rows, spec.keys, log_keys, spec.metric, spec.name))
    out["robustness_picture"] = str(picture)
    out |= robustness(rows, spec.metric)
    end_children(spec, cfg, rows)
    best = best_row(rows, spec.metric)
    files = [root / "trials.csv", picture]
    if best is not None:
        best_cfg = with_values(asdict(cfg), {k: best[k] for k in spec.keys})
        out["best"] = f"trial {best['trial']}: {spec.metric} {best[spec.metric]:.4g} with " + ", ".join(
            f"{k}={best[k]:.4g}" if isinstance(best[k], float) else f"{k}={best[k]}" for k in spec.keys
        )
        out["best_config"] = str(write_best_config(best_cfg, root, spec, best))
        files.append(Path(out["best_config"]))
        if cfg.tracking.register:
            out["registered_model"] = register_once(spec, best_cfg, best)
    tracking.log_files(spec.tracking_uri, spec.parent_run_id, files, "sweep")
    tracking.end_run(
        spec.tracking_uri, spec.parent_run_id, tags={"stablegan.sweep_best": out.get("best", "none")}
    )
    return out


def write_table(rows: list[dict], spec: SweepSpec, root: Path) -> dict[str, str]:
    path = root / "trials.csv"
    columns = ["trial", *spec.keys, "step", spec.metric, "ended"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return {"table": str(path)}


def robustness(rows: list[dict], metric: str) -> dict[str, str]:
    """How many trials ended how, and the spread of the metric over the completed ones."""
    counts = {
        e: sum(r["ended"] == e for r in rows) for e in ("completed", "stopped early", "diverged", "failed")
    }
    values = sorted(r[metric] for r in rows if r["ended"] == "completed" and math.isfinite(r[metric]))
    spread = "no completed trial"
    if values:
        spread = f"{metric} min {values[0]:.4g}, median {values[len(values) // 2]:.4g}, max {values[-1]:.4g}"
    trials = f"{len(rows)} (" + ", ".join(f"{n} {e}" for e, n in counts.items()) + ")"
    return {"trials": trials, "spread": spread}


def end_children(spec: SweepSpec, cfg: Config, rows: list[dict]) -> None:
    """Every trial's MLflow run tagged with how it ended; one Tune stopped (early, or diverged)
    is ended as KILLED, whatever its interrupted run managed to record."""
    ended = {f"{spec.name}-{r['trial']}": r["ended"] for r in rows}
    for run_id, name, status in tracking.child_runs(
        spec.tracking_uri, cfg.tracking.experiment, spec.parent_run_id
    ):
        why = ended.get(name, "")
        if why in ("stopped early", "diverged") or (status == "RUNNING" and why):
            final = "FAILED" if why == "failed" else "KILLED"
            tracking.end_run(spec.tracking_uri, run_id, status=final, tags={"stablegan.sweep_end": why})
        elif why:
            tracking.set_run_tags(spec.tracking_uri, run_id, {"stablegan.sweep_end": why})


def write_best_config(best: Config, root: Path, spec: SweepSpec, row: dict) -> Path:
    """The best trial's settings as an experiment preset (what differs from the schema's
    defaults), for `experiment=PATH`; the shards stay the user's (built-in ones are rebuilt)."""
    values = {"name": f"{spec.name}-best"} | changed(asdict(best), asdict(Config()))
    folder = root / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.yaml"
    header = (
        f"# @package _global_\n# The best trial ({row['trial']}) of sweep {spec.name}: {spec.metric} "
        f"{row[spec.metric]:.4g} at step {row['step']}.\n# Train it: stablegan train experiment={path}\n"
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(values)))
    return path


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


def register_once(spec: SweepSpec, best: Config, row: dict) -> str:
    """`register_best`, unless this sweep registered already (its finished state restored)."""
    done = tracking.run_tags(spec.tracking_uri, spec.parent_run_id).get(REGISTERED_TAG)
    if done:
        return f"{done} (registered when the sweep first finished)"
    registered = register_best(spec, best, row)
    tracking.set_run_tags(spec.tracking_uri, spec.parent_run_id, {REGISTERED_TAG: registered})
    return registered


def register_best(spec: SweepSpec, best: Config, row: dict) -> str:
    """The best trial's EMA generator registered through the same gate as any run's: evaluated
    at the end as a run is, tagged with its stability flags, put to promotion."""
    run_name = f"{spec.name}-{row['trial']}"
    weights = Path(spec.root) / "trials" / run_name / "generator_ema.pt"
    runs = tracking.child_runs(spec.tracking_uri, best.tracking.experiment, spec.parent_run_id)
    run_id = next(r for r, name, _ in runs if name == run_name)
    flags_tag = tracking.run_tags(spec.tracking_uri, run_id).get("stablegan.stability_flags")
    flags = None if flags_tag is None else tuple(f for f in flags_tag.split(",") if f)
    urls = spec.base["data"]["urls"]
    evaluation = evaluate_final(best, weights, best.eval.urls or urls)
    model_uri, decision = register_saved(
        weights, best, run_id, spec.tracking_uri, str(urls), evaluation, flags
    )
    return f"{model_uri} ({decision})"


__all__ = ["SweepSpec", "best_row", "changed", "plan_sweep", "run_sweep"]
