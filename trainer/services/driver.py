"""The driver: a prepared run (`plan.prepare`) tracked in MLflow, fitted on Ray Train, then
concluded (`conclude.conclude`: outputs, evaluation, registration, promotion).

    run(cfg) = prepare -> track -> fit -> conclude
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data_pipeline import objstore
from trainer.config import Config
from trainer.services import local_ray, tracking
from trainer.services.conclude import RegistryError, conclude
from trainer.services.plan import RunPlan, UserError, prepare
from trainer.train.worker import Worker

__all__ = ["RegistryError", "UserError", "run"]


def run(cfg: Config) -> dict[str, str]:
    """Train `cfg` end to end; return where the results are."""
    plan = prepare(cfg)
    init_ray(plan.cfg)  # before the MLflow run: an unreachable cluster leaves no run behind
    run_id = open_tracking(plan)
    if plan.init is not None:
        tracking.set_run_tags(plan.tracking_uri, run_id, plan.init.tags())
    result = fit(plan, run_id)
    return conclude(plan, result.checkpoint, result.metrics or {}, run_id)


def fit(plan: RunPlan, run_id: str, callbacks: list | None = None, start_from: str | None = None) -> Result:
    """Ray Train's fit of the plan (`callbacks`: Ray Train's, e.g. a sweep's report to Tune;
    `start_from`: a checkpoint folder of another run to continue from, population-based
    training's exploit); a failure ends the MLflow run as FAILED."""
    try:
        result = make_trainer(plan, run_id, callbacks, start_from).fit()
    except Exception as exc:
        tracking.end_run(plan.tracking_uri, run_id, status="FAILED")
        raise RuntimeError(f"training run {plan.run_name} failed: {exc}") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"training run {plan.run_name} ended without a checkpoint")
    return result


def open_tracking(plan: RunPlan) -> str:
    """The MLflow run id: the run is created, or found again by its name on a resume."""
    cfg, uri = plan.cfg, plan.tracking_uri
    try:
        tracking.check_server(uri)
        run_id, resumed = tracking.start_run(
            uri, cfg.tracking.experiment, plan.run_name, plan.config_dict(), cfg.tracking.artifact_location
        )
    except Exception as exc:  # noqa: BLE001 - any failure here means: no usable tracking server
        raise UserError(
            f"cannot open the MLflow run at {tracking.redact(uri)}: "
            f"{tracking.redact(str(exc).splitlines()[0][:300])}. Start the server "
            "(launch/local_cluster.sh up starts one), fix tracking.uri / $MLFLOW_TRACKING_URI, or leave "
            "both empty for a local sqlite store"
        ) from None
    where = tracking.redact(uri)
    print(
        f"stablegan: run {plan.run_name} ({'resumed' if resumed else 'new'}), MLflow run {run_id} at {where}"
    )
    return run_id


def make_trainer(
    plan: RunPlan, run_id: str, callbacks: list | None = None, start_from: str | None = None
) -> TorchTrainer:
    """Ray Train's trainer: one `train_loop` per worker; a new one with the same name and
    storage hands the workers the latest checkpoint (a resume)."""
    t = plan.cfg.trainer
    init = plan.init
    loop_config = {
        "cfg": plan.config_dict(),
        "data_urls": plan.data_urls,
        "tracking_uri": plan.tracking_uri,
        "run_id": run_id,
        "run_dir": str(plan.run_dir),  # where Ray Train puts the checkpoints
        "init": {"G": init.generator, "D": init.discriminator} if init else None,
        "progress_bar": plan.progress_bar,
        "start_from": start_from,
        "resume_from": own_checkpoint(plan.resume_from),
    }
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        # One machine: a file rendezvous, so no torch.distributed port listens beyond loopback.
        torch_config=(local_ray.LocalTorchConfig if local_ray.is_local() else TorchConfig)(
            backend="nccl" if t.use_gpu else "gloo"
        ),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **t.worker_resources},
        ),
        run_config=RunConfig(
            name=plan.run_name,
            **plan.ray_storage(),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def train_loop(config: dict) -> None:
    """Ray Train's per-rank entry: `config` holds the resolved config, shard URLs and MLflow run.
    Rank 0 logs through a buffered `RunLogger`; the worker itself knows nothing of MLflow."""
    logger = None
    if ray.train.get_context().get_world_rank() == 0:
        logger = tracking.RunLogger(config["tracking_uri"], config["run_id"])
    try:
        worker = Worker(
            config["cfg"],
            config["data_urls"],
            config["run_dir"],
            logger,
            config["progress_bar"],
            config["init"],
        )
        handed = ray.train.get_checkpoint() or config.get("resume_from")
        if handed is not None:  # this run's own: a resume (it wins over start_from)
            worker.resume(local_checkpoint(handed, Path(config["run_dir"])))
        elif config.get("start_from"):
            worker.inherit(Path(config["start_from"]))
    except BaseException:
        if logger is not None:
            logger.close(timeout=0)
        raise
    worker.run()


def own_checkpoint(found: str | None) -> ray.train.Checkpoint | None:
    """The run's newest checkpoint the driver found, for when Ray Train hands none: its
    controller registers checkpoints asynchronously, so a driver killed just after the first
    ones were written leaves them on storage unregistered, and the run would start over."""
    if found is None:
        return None
    if objstore.is_s3(found):
        return ray.train.Checkpoint(found[len(objstore.S3) :], filesystem=objstore.pyarrow_fs())
    return ray.train.Checkpoint(found)


def local_checkpoint(handed: ray.train.Checkpoint, run_dir: Path) -> Path:
    """The checkpoint Ray hands over, as a local folder: itself on a shared filesystem, else
    downloaded from object storage into the run's local folder (renamed into place whole, so
    ranks on one machine never see a half-written copy)."""
    if handed.filesystem.type_name == "local":
        return Path(handed.path)
    target = run_dir / Path(handed.path).name
    if not target.is_dir():
        tmp = run_dir / f".{target.name}.{secrets.token_hex(4)}"
        handed.to_directory(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another rank got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def init_ray(cfg: Config) -> None:
    """Connect to `cluster.address` / $RAY_ADDRESS, or start a local Ray on loopback."""
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    try:
        if address:
            check_reachable(address)
            ray.init(address=address, log_to_driver=True)
        else:
            local_ray.start(cfg.cluster.num_cpus or None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address!r}: {exc}. Start one (launch/local_cluster.sh up) "
            "or leave cluster.address empty to run on a local Ray"
        ) from None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a Ray `host:port` (or ray://host:port) address: a
    ray.init to a dead address waits for minutes. "auto" is resolved as ray.init resolves it
    (the cluster `ray start` last recorded, which may be long gone) and checked the same way."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        address = canonicalize_bootstrap_address_or_die("auto")  # ConnectionError if none is found
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc.strerror or exc})") from None
