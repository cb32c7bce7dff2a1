"""One trial of a sweep, in its Ray Tune actor: a whole driver run (prepare -> track -> fit ->
conclude) of the sweep's config with the trial's settings.

Ray Train reports from its controller; `Relay` hands rank 0's reports to this process, which
reports them to Tune with a small checkpoint naming the run's checkpoint folder. That is what
population-based training copies: a trial told to exploit starts again with a leader's
pointer, copies that checkpoint folder into a new run of its own and continues from it
(`Worker.inherit`) under its perturbed settings; the chain of runs its weights came through
is its lineage, kept in the pointer and on the MLflow run.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from trainer.services import tracking
from trainer.services.conclude import conclude
from trainer.services.driver import fit, open_tracking
from trainer.services.plan import prepare
from trainer.services.space import Dimension, with_values

RUNG = "rung_step"  # the schedulers' clock: the step, on every report but a trial's last
POINTER = "source.json"  # a Tune checkpoint's one file: which run checkpoint it stands for
SWEEP_TAG = "stablegan.sweep"


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


class Relay(UserCallback):
    """Ray Train's reports, from its controller to the trial's process: rank 0's metrics with
    the metric always there (inf when a checkpoint had no evaluation) and `rung_step` on all
    but the last report, so that no scheduler stops a trial at its last step, before its run
    concludes (weights saved, MLflow run ended)."""

    def __init__(self, queue: Queue, metric: str, max_steps: int):
        self.queue, self.metric, self.max_steps = queue, metric, max_steps

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:  # noqa: ANN001 - Ray's signature
        first = {self.metric: math.inf} | dict(metrics[0])
        if first.get("step", 0) < self.max_steps:
            first[RUNG] = first.get("step", 0)
        self.queue.put((first, checkpoint.path if checkpoint is not None else None))


@dataclass(frozen=True)
class Start:
    """Where a trial's run starts: fresh, its own run again, or a leader's checkpoint."""

    run_name: str
    lineage: list  # [{"run", "trial", "step"}, ...]: the runs its weights came through, oldest first
    inherit: str | None = None  # the leader's checkpoint folder (population-based training)


def run_trial(params: dict, spec: SweepSpec) -> None:
    """One trial, tracked as a child of the sweep's MLflow run."""
    trial_id = tune.get_context().get_trial_id()
    start = starting_point(spec, trial_id)
    cfg = with_values(spec.base, params)
    plan = prepare(replace(cfg, trainer=replace(cfg.trainer, run_name=start.run_name)))
    inherit = take_over(start.inherit, plan.run_dir) if start.inherit and not plan.resuming else None
    run_id = open_tracking(plan)
    tags = {"mlflow.parentRunId": spec.parent_run_id, SWEEP_TAG: spec.name, "stablegan.trial": trial_id}
    tags |= {"tune." + k.replace("+", "/"): v for k, v in params.items()}
    if start.lineage:
        tags |= {"stablegan.lineage": json.dumps(start.lineage)}
    tracking.set_run_tags(plan.tracking_uri, run_id, tags)
    queue: Queue = Queue(actor_options={"num_cpus": 0})
    box: dict = {}

    def train() -> None:
        try:
            relay = Relay(queue, spec.metric, plan.cfg.trainer.max_steps)
            box["result"] = fit(plan, run_id, [relay], start_from=inherit)
        except BaseException as exc:  # noqa: BLE001 - raised again in the trial's thread below
            box["error"] = exc
        finally:
            queue.put(None)

    thread = threading.Thread(target=train, name="stablegan-trial-fit", daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        report(*item, trial_id, start)
    thread.join()
    if "error" in box:
        raise box["error"]
    result = box["result"]
    conclude(plan, result.checkpoint, result.metrics or {}, run_id)


def starting_point(spec: SweepSpec, trial_id: str) -> Start:
    """From the Tune checkpoint this trial was started with: none (a new run), its own (a
    restarted trial: its run resumes), or another trial's (an exploit: a new run of its own
    that takes that trial's checkpoint over)."""
    handed = tune.get_checkpoint()
    if handed is None:
        return Start(f"{spec.name}-{trial_id}", [])
    with handed.as_directory() as folder:
        source = json.loads((Path(folder) / POINTER).read_text())
    if source["trial"] == trial_id:
        return Start(source["run"], source["lineage"])
    link = {"run": source["run"], "trial": source["trial"], "step": source["step"]}
    name = f"{spec.name}-{trial_id}-{secrets.token_hex(2)}"
    return Start(name, [*source["lineage"], link], inherit=source["checkpoint"])


def take_over(folder: str, run_dir: Path) -> str:
    """A copy of a leader's checkpoint in this run's folder (the leader's run keeps only its
    newest few, so the original may go at any time); its path."""
    target = run_dir / f"inherited_{Path(folder).name}"
    if not target.is_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{target.name}.{secrets.token_hex(4)}"
        shutil.copytree(folder, tmp)
        tmp.rename(target)
    return str(target)


def report(metrics: dict, checkpoint: str | None, trial_id: str, start: Start) -> None:
    """One of Ray Train's reports to Tune, with a pointer to its run checkpoint."""
    if checkpoint is None:
        tune.report(metrics)
        return
    source = {
        "trial": trial_id,
        "run": start.run_name,
        "checkpoint": checkpoint,
        "step": int(metrics.get("step", 0)),
        "lineage": start.lineage,
    }
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / POINTER).write_text(json.dumps(source))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
