"""After training: the run's outputs saved, the final generator evaluated, registered and put
to promotion, and the stability summary turned into tags and one line for the user."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import ray
import torch

from data_pipeline import objstore
from trainer.config import Config
from trainer.eval.evaluator import Evaluator, NonFiniteSamples, Result
from trainer.services import finetune, promotion, tracking
from trainer.services.plan import RunPlan
from trainer.train import checkpoint
from trainer.train.worker import build_models, sample_picture

log = logging.getLogger("stablegan.run")


class RegistryError(RuntimeError):
    """Training finished and the weights are on disk, but registering them failed."""

    def __init__(self, result: dict[str, str]):
        self.result = result
        weights = result["generator_weights"]
        super().__init__(
            f"training finished but registering the generator failed: {result['registered_model']}. "
            f"Register the saved weights later with: python -m trainer.register weights={weights} "
            f"run_id={result['mlflow_run_id']}"
        )


def conclude(plan: RunPlan, handed: ray.train.Checkpoint, metrics: dict, run_id: str) -> dict[str, str]:
    """Everything after a successful fit, in order: outputs saved (and uploaded beside an s3://
    run), weights logged for fine-tuning, stability summary, final evaluation, registration and
    promotion, the MLflow run ended. Returns where the results are."""
    cfg, uri = plan.cfg, plan.tracking_uri
    out = {"run": plan.run_name, "mlflow_run_id": run_id, "tracking_uri": tracking.redact(uri)}
    out["checkpoint"] = handed.path
    out |= save_outputs(cfg, plan.run_dir, handed, plan.config_dict())
    if plan.remote_dir:
        upload_outputs(plan.run_dir, plan.remote_dir)
        out["checkpoint"] = f"{objstore.S3}{handed.path}"
    try:
        finetune.log_weights(uri, run_id, plan.run_dir)
    except Exception as exc:  # noqa: BLE001 - the weights stay on disk; only fine-tuning from the registry misses them
        log.warning("could not log the weights for fine-tuning to MLflow run %s (%s)", run_id, exc)
    tags = judge(plan, metrics, out, run_id)
    try:
        tracking.end_run(uri, run_id, tags=tags)
    except Exception as exc:  # noqa: BLE001 - the results are on disk; the run just stays RUNNING
        log.warning("could not mark MLflow run %s finished (%s); it shows as RUNNING", run_id, exc)
    if out.get("registered_model", "").startswith("FAILED"):
        raise RegistryError(out)
    return out


def judge(plan: RunPlan, metrics: dict, out: dict[str, str], run_id: str) -> dict:
    """After training: the stability summary, the final evaluation and registration with its
    promotion decision, added to `out`; returns the run's end tags."""
    cfg, uri, urls = plan.cfg, plan.tracking_uri, plan.data_urls
    tags: dict = {"stablegan.steps": cfg.trainer.max_steps}
    flags: tuple[str, ...] | None = None  # None: no stability summary (stability=off)
    if "stability" in metrics:
        summary = json.loads(metrics["stability"])
        stability_tags, out["stability"] = describe_stability(summary)
        flags = stability_flags(summary)
        tags |= stability_tags | {"stablegan.stability_flags": ",".join(flags)}
    weights = Path(out["generator_weights"])
    evaluation = evaluate_final(cfg, weights, cfg.eval.urls or urls)
    if evaluation is not None:
        info = evaluation.info
        out["evaluation"] = f"{evaluation.line()} ({info['features']}, {info['num_fake']} samples)"
        if not cfg.tracking.register:  # registering logs it to the run and to the version
            try:
                final = {f"eval/{k}": v for k, v in evaluation.metrics.items()}
                tracking.log_metrics(uri, run_id, final, cfg.trainer.max_steps)
            except Exception as exc:  # noqa: BLE001 - the line above shows it all the same
                log.warning("could not log the final evaluation to MLflow run %s (%s)", run_id, exc)
    if cfg.tracking.register:
        try:
            out["registered_model"], out["promotion"] = register_saved(
                weights, cfg, run_id, uri, str(urls), evaluation, flags
            )
        except Exception as exc:  # noqa: BLE001 - the weights are safe on disk; say how to retry
            log.exception("registering the generator failed")
            out["registered_model"] = f"FAILED ({exc}); the weights are in {out['generator_weights']}"
    return tags


def save_outputs(cfg: Config, out_dir: Path, ckpt: ray.train.Checkpoint, config_dict: dict) -> dict[str, str]:
    """The EMA weights, config and a sample picture beside the checkpoints (each written
    atomically): what registering, or registering again later, needs."""
    try:
        os.getcwd()
    except FileNotFoundError:
        # Under `ray job submit` Ray may delete the unpacked working_dir once the training
        # workers release it; MLflow needs a working directory to log the model.
        os.chdir(out_dir)
    with ckpt.as_directory() as ckpt_dir:
        ema_state = checkpoint.load_ema_weights(Path(ckpt_dir))
        d_state = checkpoint.load_module_weights(Path(ckpt_dir), "D")
    weights = out_dir / finetune.G_FILE
    atomic_write(weights, lambda f: torch.save(ema_state, f))  # kept whatever the registry does
    atomic_write(out_dir / finetune.D_FILE, lambda f: torch.save(d_state, f))  # for fine-tuning
    config_json = json.dumps(config_dict, indent=2, sort_keys=True).encode()
    atomic_write(out_dir / "config.json", lambda f: f.write(config_json))
    picture = out_dir / "samples.png"
    png = sample_picture(build_generator(cfg, ema_state), cfg, cfg.trainer.max_steps)
    atomic_write(picture, lambda f: f.write(png))
    return {"generator_weights": str(weights), "sample_image": str(picture)}


def upload_outputs(run_dir: Path, remote: str) -> None:
    """The final weights, config and picture beside the run's checkpoints in object storage
    (checkpoint mirrors stay local: Ray Train uploaded those)."""
    for name in (finetune.G_FILE, finetune.D_FILE, "config.json", "samples.png"):
        bucket, key = objstore.split(f"{remote}/{name}")
        objstore.client().upload_file(str(run_dir / name), bucket, key)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file in the same folder, then rename: a crash leaves
    the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_generator(cfg: Config, state: dict | None = None) -> torch.nn.Module:
    """The generator that `cfg` describes, optionally loaded with `state`."""
    G, _ = build_models(cfg)
    if state is not None:
        G.load_state_dict(state)
    return G


def register_saved(
    weights: Path,
    cfg: Config,
    run_id: str,
    uri: str,
    dataset: str,
    evaluation: Result | None = None,
    flags: tuple[str, ...] | None = None,
) -> tuple[str, str]:
    """Register EMA weights saved by a run as a new version (alias `registry.candidate_alias`)
    with its evaluation and stability flags (None: the run made no stability summary, so none
    could be raised), then let promotion decide whether it becomes `tracking.alias`. Returns
    (its models:/ URI, the decision in one line)."""
    G = build_generator(cfg, torch.load(weights, weights_only=True))
    name, alias = cfg.tracking.registered_model, cfg.tracking.alias
    tags = {
        "run_id": run_id,
        "dataset": dataset,
        "steps": cfg.trainer.max_steps,
        "experiment": cfg.name,
        "stability.flags": ",".join(flags or ()),
        "stability.summary": str(flags is not None).lower(),
    }
    if cfg.trainer.init_from:
        tags["init_from"] = cfg.trainer.init_from
    candidate = cfg.registry.candidate_alias
    classes = cfg.model.num_classes if cfg.model.conditional else 0
    version = tracking.register_generator(
        uri, run_id, G, cfg.model.latent_dim, name, tags, (candidate,), num_classes=classes
    )
    if evaluation is not None:
        tracking.log_evaluation(uri, name, version, evaluation.metrics, evaluation.info)
    decision = "no promotion (tracking.alias is empty)"
    if alias:
        decision = promotion.promote(uri, name, version, cfg.registry, alias).line(name, version, alias)
    return f"models:/{name}/{version} (also models:/{name}@{candidate}, models:/{name}@latest)", decision


def evaluate_final(cfg: Config, weights: Path, urls: str | list) -> Result | None:
    """The final EMA generator's evaluation (`eval.at_end`), or None when off or failed:
    a failed evaluation is logged and the generator still registered, unpromoted."""
    if not cfg.eval.at_end:
        return None
    try:
        G = build_generator(cfg, torch.load(weights, weights_only=True)).eval()
        result = Evaluator(urls, cfg.eval, progress=False)(G, cfg.model.latent_dim)
    except NonFiniteSamples as exc:
        log.warning("the final generator is not evaluated: %s", exc)
        return None
    except Exception:  # noqa: BLE001 - the weights are safe on disk; evaluate later by hand
        log.exception("evaluating the final generator failed; run python -m trainer.promote later")
        return None
    return result


def stability_flags(summary: dict) -> tuple[str, ...]:
    """What bars a version from promotion: divergence, non-finite values, a spent guard budget."""
    flags = ["diverged"] if summary["diverged"] else []
    if "nonfinite" in summary.get("reasons", []):
        flags.append("nonfinite")
    if summary.get("guard", {}).get("budget_spent"):
        flags.append("guard_budget_spent")
    return tuple(flags)


def describe_stability(summary: dict) -> tuple[dict, str]:
    """The end-of-run stability summary as MLflow run tags and one line for the user."""
    tags = {
        "stablegan.diverged": str(summary["diverged"]).lower(),
        "stablegan.diverged_at": summary["diverged_at"] if summary["diverged"] else "",
        "stablegan.first_signal": summary["first_signal"],
    }
    line = "diverged at step {diverged_at}".format(**summary) if summary["diverged"] else "stable"
    if "guard" in summary:
        g = summary["guard"]
        tags |= {
            "stablegan.guard.rollbacks": g["rollbacks"],
            "stablegan.guard.triggers": ",".join(g["triggers"]),
        }
        line += f"; guard: {g['rollbacks']} rollback(s), {g['events']} event(s)"
        if g["triggers"]:
            line += f" ({', '.join(g['triggers'])}), final lr x{g['lr_scale']:g}, {g['penalty']}"
    return tags, line
