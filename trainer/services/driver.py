"""The driver: prepare data, open the MLflow run, start Ray Train, register the generator."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data_pipeline import objstore
from data_pipeline.make_shards import MakeShardsConfig, write_shards
from data_pipeline.shards import MANIFEST, ShardSpecError, absolute, resolve
from data_pipeline.stream import load_callable
from trainer.config import Config, ConfigError
from trainer.eval import features
from trainer.eval.evaluator import Evaluator, NonFiniteSamples, Result, feature_spec
from trainer.services import finetune, local_ray, promotion, tracking
from trainer.train import checkpoint
from trainer.train.worker import Worker, build_models, sample_picture

log = logging.getLogger("stablegan.run")


class UserError(RuntimeError):
    """Something the user can fix (data, cluster address, registry); the message says how."""


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


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file in the same folder, then rename: a crash leaves
    the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def builtin_shards(cfg: Config, root: Path) -> str:
    """Write the built-in dataset once under `root/datasets/` and return its folder."""
    d, m = cfg.data, cfg.model
    readers = cfg.trainer.num_workers * max(1, d.loader_workers)
    res = m.resolution or 32  # 0: the model takes the shards' size, which defaults to 32 px
    if d.builtin == "digits":
        ch = m.channels or 1
        out = root / "datasets" / f"digits-{res}px-{ch}ch"
        shard_size = math.ceil(1797 / max(8, readers))
        mcfg = MakeShardsConfig(
            source="digits", out=str(out), resolution=res, channels=ch, shard_size=shard_size
        )
    elif d.builtin == "stacked_digits":
        out = root / "datasets" / f"stacked_digits-{res}px"
        mcfg = MakeShardsConfig(
            source="stacked_digits", out=str(out), resolution=res, channels=3,
            num_samples=50_000, shard_size=math.ceil(50_000 / max(16, readers)),
        )  # fmt: skip
    else:
        out = root / "datasets" / d.builtin
        mcfg = MakeShardsConfig(source=d.builtin, out=str(out), num_samples=100_000, shard_size=10_000)
    manifest = out / MANIFEST
    out.parent.mkdir(parents=True, exist_ok=True)
    # Runs of a parallel sweep start together: one writes the shards while the others wait,
    # rather than one rewriting a shard another is already reading.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not manifest.is_file() or len(resolve(str(out)).urls) < readers:
            write_shards(mcfg, progress=False)
    return str(out)


def check_classes(cfg: Config, manifest: dict | None) -> None:
    """A conditional model's class count, from the shards' manifest when not set (cfg is
    completed here, before it travels to the workers)."""
    classes = (manifest or {}).get("classes") or []
    m = cfg.model
    if not classes and not m.num_classes:
        raise UserError(
            "model.conditional=true needs class labels: these shards list no classes in a manifest; "
            "make them from a labelled source (make_shards source=digits, or npz with label_key=) "
            "or set model.num_classes"
        )
    if classes and m.num_classes and m.num_classes != len(classes):
        raise UserError(
            f"model.num_classes={m.num_classes} but the shards have {len(classes)} classes: set "
            f"model.num_classes={len(classes)} (or 0 to take it from the shards)"
        )
    m.num_classes = m.num_classes or len(classes)
    if m.num_classes < 2:
        raise UserError(f"model.conditional=true needs at least 2 classes; the shards have {m.num_classes}")


def take_shape(cfg: Config, shape: tuple) -> None:
    """model.channels / model.resolution = 0: the shards' (cfg is completed here, before it
    travels to the workers), then checked as if the user had set them."""
    m = cfg.model
    if len(shape) != 3 or (m.channels and m.resolution):
        return
    m.channels, m.resolution = m.channels or shape[0], m.resolution or shape[-1]
    try:
        m.check()
    except ConfigError as exc:
        raise UserError(f"{exc} (taken from the shards, which hold {shape} images)") from None


def fit_readers(cfg: Config, num_shards: int) -> None:
    """Every reader (rank x loader worker) needs shards of its own to read each sample once per
    epoch: with too few shards, fewer loader workers per rank (said), or a clear error."""
    d, ranks = cfg.data, cfg.trainer.num_workers
    if d.resample or num_shards >= ranks * max(1, d.loader_workers):
        return
    if num_shards < ranks:
        raise UserError(
            f"{num_shards} shard(s) cannot be split over trainer.num_workers={ranks} ranks without "
            "repeating data: write more, smaller shards (make_shards shard_size=...), use fewer "
            "workers, or set data.resample=true"
        )
    print(
        f"stablegan: {num_shards} shard(s) over {ranks} rank(s): data.loader_workers "
        f"{d.loader_workers} -> {num_shards // ranks}, so that each reader has shards of its own"
    )
    d.loader_workers = num_shards // ranks


def check_data(cfg: Config, urls: str | list) -> None:
    """Fail before Ray starts when the shards are missing or do not fit the model."""
    try:
        shards = resolve(urls)
    except ShardSpecError as exc:
        raise UserError(f"data.urls: {exc}") from None
    fit_readers(cfg, len(shards.urls))
    for spec in (*cfg.data.decoders, *cfg.data.stages):
        try:
            load_callable(spec)
        except ShardSpecError as exc:
            raise UserError(f"data.stages / data.decoders: {exc}") from None
    kind = shards.kind
    if cfg.model.conditional:
        check_classes(cfg, shards.manifest)
    if kind is None:
        if cfg.model.arch != "mlp" and not (cfg.model.resolution and cfg.model.channels):
            raise UserError(
                "model.resolution=0 / model.channels=0 take the size from the shards' manifest, and "
                "these shards have none: set model.resolution and model.channels"
            )
        return  # no manifest: shapes are checked per sample while streaming
    want = "points" if cfg.model.arch == "mlp" else "image"
    if kind != want:
        raise UserError(
            f"data.urls holds {kind} samples but model.arch={cfg.model.arch} needs {want} samples; "
            f"use {'model=mlp' if kind == 'points' else 'model=dcgan32 or model=dcgan64'}"
        )
    if want == "image":
        shape = tuple(shards.sample_shape or ())
        take_shape(cfg, shape)
        expected = (cfg.model.channels, cfg.model.resolution, cfg.model.resolution)
        if shape != expected:
            raise UserError(
                f"the shards hold {shape} images but the model expects {expected}: set "
                f"model.channels={shape[0]} model.resolution={shape[-1]}, or rebuild the shards "
                f"with make_shards channels={expected[0]} resolution={expected[-1]}"
            )


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
    flags: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Register EMA weights saved by a run as a new version (alias `registry.candidate_alias`)
    with its evaluation and stability flags, then let promotion decide whether it becomes
    `tracking.alias`. Returns (its models:/ URI, the decision in one line)."""
    G = build_generator(cfg, torch.load(weights, weights_only=True))
    name, alias = cfg.tracking.registered_model, cfg.tracking.alias
    tags = {
        "run_id": run_id,
        "dataset": dataset,
        "steps": cfg.trainer.max_steps,
        "experiment": cfg.name,
        "stability.flags": ",".join(flags),
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


def check_eval(cfg: Config, urls: str | list) -> None:
    """Load the feature network before training, so a missing one fails now, not at the end."""
    if not (cfg.eval.at_end or cfg.eval.every):
        return
    try:
        shards = resolve(urls)
    except ShardSpecError as exc:
        raise UserError(f"{'eval.urls' if cfg.eval.urls else 'data.urls'}: {exc}") from None
    if shards.kind is not None and (shards.kind == "points") != (cfg.model.arch == "mlp"):
        raise UserError(
            f"eval.urls={cfg.eval.urls!r} holds {shards.kind} samples, unlike model.arch={cfg.model.arch}"
        )
    if shards.kind == "points":
        return
    try:
        features.load(feature_spec(cfg.eval, shards.manifest), cfg.eval.inception_weights)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{exc} (or turn evaluation off: eval.at_end=false eval.every=0)") from None


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
        handed = ray.train.get_checkpoint()
        if handed is not None:
            worker.resume(local_checkpoint(handed, Path(config["run_dir"])))
    except BaseException:
        if logger is not None:
            logger.close(timeout=0)
        raise
    worker.run()


def run(cfg: Config) -> dict[str, str]:
    """Train `cfg` end to end; return where the results are."""
    os.environ.update(objstore.endpoint_env())  # MLflow's S3 store on boto3's endpoint (Ray inherits it)
    run_name, storage, urls, resuming = prepare_run(cfg)
    config_dict = asdict(cfg)
    # A resume takes G and D from the run's own checkpoint: init_from is not fetched again.
    init = None if resuming else fetch_init(cfg, storage / run_name)
    init_ray(cfg)  # before the MLflow run: an unreachable cluster leaves no run behind
    uri, run_id = open_tracking(cfg, run_name, config_dict)
    if init is not None:
        tracking.set_run_tags(uri, run_id, init.tags())
    loop_config = {
        "cfg": config_dict,
        "data_urls": urls,
        "tracking_uri": uri,
        "run_id": run_id,
        "run_dir": str(storage / run_name),  # where Ray Train puts the checkpoints
        "init": {"G": init.generator, "D": init.discriminator} if init else None,
        "progress_bar": cfg.trainer.progress == "bar"
        or (cfg.trainer.progress == "auto" and sys.stdout.isatty()),
    }
    try:
        result = make_trainer(cfg, run_name, storage, loop_config).fit()
    except Exception as exc:
        tracking.end_run(uri, run_id, status="FAILED")
        raise RuntimeError(f"training run {run_name} failed: {exc}") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint")
    out = {
        "run": run_name,
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
        "checkpoint": result.checkpoint.path,
    }
    out |= save_outputs(cfg, storage / run_name, result.checkpoint, config_dict)
    if objstore.is_s3(cfg.trainer.storage_path):
        remote = f"{cfg.trainer.storage_path.rstrip('/')}/{run_name}"
        upload_outputs(storage / run_name, remote)
        out["checkpoint"] = f"{objstore.S3}{result.checkpoint.path}"
    try:
        finetune.log_weights(uri, run_id, storage / run_name)
    except Exception as exc:  # noqa: BLE001 - the weights stay on disk; only fine-tuning from the registry misses them
        log.warning("could not log the weights for fine-tuning to MLflow run %s (%s)", run_id, exc)
    tags = conclude(cfg, result.metrics or {}, out, uri, run_id, urls)
    try:
        tracking.end_run(uri, run_id, tags=tags)
    except Exception as exc:  # noqa: BLE001 - the results are on disk; the run just stays RUNNING
        log.warning("could not mark MLflow run %s finished (%s); it shows as RUNNING", run_id, exc)
    if out.get("registered_model", "").startswith("FAILED"):
        raise RegistryError(out)
    return out


def conclude(
    cfg: Config, metrics: dict, out: dict[str, str], uri: str, run_id: str, urls: str | list
) -> dict:
    """After training: the stability summary, the final evaluation and registration with its
    promotion decision, added to `out`; returns the run's end tags."""
    tags: dict = {"stablegan.steps": cfg.trainer.max_steps}
    flags: tuple[str, ...] = ()
    if "stability" in metrics:
        summary = json.loads(metrics["stability"])
        stability_tags, out["stability"] = describe_stability(summary)
        tags |= stability_tags
        flags = stability_flags(summary)
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


def local_storage(storage_path: str) -> Path:
    """The run files' local folder: `storage_path` itself, or for s3:// a mirror under the cache
    (built-in datasets, the final weights and picture before upload, rollback checkpoints)."""
    if objstore.is_s3(storage_path):
        bucket, prefix = objstore.split(storage_path)
        return features.cache_root() / "storage" / bucket / prefix
    return Path(storage_path).expanduser().resolve()


def previous_config(cfg: Config, run_name: str) -> dict | None:
    """The config of this run's newest checkpoint, if the run has one (a resume)."""
    storage = cfg.trainer.storage_path
    if objstore.is_s3(storage):
        try:
            found = objstore.list_keys(f"{storage.rstrip('/')}/{run_name}/checkpoint_", "/config.json")
        except Exception as exc:  # noqa: BLE001 - boto3: no bucket, no credentials, no endpoint
            raise UserError(f"trainer.storage_path={storage}: cannot list it ({exc})") from None
        return json.loads(objstore.read_bytes(found[-1])) if found else None
    previous = sorted((local_storage(storage) / run_name).glob("checkpoint_*/config.json"))
    return checkpoint.load_config(previous[-1].parent) if previous else None


def prepare_run(cfg: Config) -> tuple[str, Path, str | list, bool]:
    """The run's name, its local storage folder, checked shard URLs (built-in data written on
    first use) and whether it resumes; a resume is refused here if it changes the model or data
    layout."""
    t = cfg.trainer
    # The random tail keeps apart runs of a parallel sweep that start in the same second.
    run_name = t.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    storage = local_storage(t.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    cfg.data.urls, cfg.eval.urls = absolute(cfg.data.urls), absolute(cfg.eval.urls)
    urls = cfg.data.urls or builtin_shards(cfg, storage)
    if not isinstance(urls, str):
        urls = list(urls)
    check_data(cfg, urls)
    check_eval(cfg, cfg.eval.urls or urls)
    previous = previous_config(cfg, run_name)
    if previous is not None:  # resuming: the same model and data layout, or a clear error before any work
        try:
            checkpoint.check_compatible(previous, asdict(cfg))
        except checkpoint.CheckpointError as exc:
            raise UserError(f"trainer.run_name={run_name}: {exc}") from None
    return run_name, storage, urls, previous is not None


def fetch_init(cfg: Config, run_dir: Path) -> finetune.Init | None:
    """`trainer.init_from`'s weights, downloaded and checked before Ray starts (None without it)."""
    if not cfg.trainer.init_from:
        return None
    try:
        init = finetune.fetch(cfg, tracking.resolve_uri(cfg.tracking.uri), run_dir / "init")
    except (LookupError, ValueError) as exc:
        raise UserError(str(exc)) from None
    parts = "G and D" if init.discriminator else "G (its run logged no discriminator: D starts fresh)"
    print(f"stablegan: fine-tuning from {init.version}: {parts}")
    return init


def open_tracking(cfg: Config, run_name: str, config_dict: dict) -> tuple[str, str]:
    """(tracking URI, MLflow run id): the run is created, or found again by its name on a resume."""
    uri = tracking.resolve_uri(cfg.tracking.uri)
    try:
        tracking.check_server(uri)
        run_id, resumed = tracking.start_run(
            uri, cfg.tracking.experiment, run_name, config_dict, cfg.tracking.artifact_location
        )
    except Exception as exc:  # noqa: BLE001 - any failure here means: no usable tracking server
        raise UserError(
            f"cannot open the MLflow run at {uri}: {str(exc).splitlines()[0][:300]}. Start the server "
            "(launch/local_cluster.sh up starts one), fix tracking.uri / $MLFLOW_TRACKING_URI, or leave "
            "both empty for a local sqlite store"
        ) from None
    print(f"stablegan: run {run_name} ({'resumed' if resumed else 'new'}), MLflow run {run_id} at {uri}")
    return uri, run_id


def ray_storage(storage_path: str, local: Path) -> dict:
    """Ray Train's storage arguments: the local folder, or the S3 prefix through pyarrow's S3
    filesystem on the environment's endpoint (Ray wants the path without its scheme then)."""
    if objstore.is_s3(storage_path):
        return {
            "storage_path": storage_path[len(objstore.S3) :].rstrip("/"),
            "storage_filesystem": objstore.pyarrow_fs(),
        }
    return {"storage_path": str(local)}


def make_trainer(cfg: Config, run_name: str, storage: Path, loop_config: dict) -> TorchTrainer:
    """Ray Train's trainer: one `train_loop` per worker; a new one with the same name and
    storage hands the workers the latest checkpoint (a resume)."""
    t = cfg.trainer
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
            name=run_name,
            **ray_storage(t.storage_path, storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
    )


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
