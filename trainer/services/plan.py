"""A run, prepared once: the composed config and the environment turned into one checked,
immutable `RunPlan` before Ray, DeepSpeed or MLflow start.

`prepare` resolves the data (built-in shards written on first use), completes what follows
from it (the model's shape and class count, loader workers per rank) in a new config rather
than changing the one it was given, checks the evaluation data and feature network, and finds
the resume point and any fine-tuning weights. The driver, and a sweep per trial, only read
the plan it returns.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from data_pipeline import objstore
from data_pipeline.make_shards import MakeShardsConfig, write_shards
from data_pipeline.shards import MANIFEST, ShardSpecError, absolute, resolve
from data_pipeline.stream import load_callable
from trainer.config import Config, ConfigError
from trainer.eval import features
from trainer.eval.evaluator import feature_spec
from trainer.services import finetune, tracking
from trainer.train import checkpoint


class UserError(RuntimeError):
    """Something the user can fix (data, cluster address, registry); the message says how."""


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, checked: read by the driver, never changed."""

    cfg: Config  # completed from the data and checked
    run_name: str
    storage: Path  # the run files' local folder (a mirror of an s3:// storage_path)
    data_urls: str | list[str]  # the shards training reads (built-in ones written)
    resume_from: str | None  # the run's newest checkpoint (a folder, or an s3:// prefix), if any
    init: finetune.Init | None  # fine-tuning weights, fetched (None on a resume)
    tracking_uri: str
    progress_bar: bool

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    @property
    def run_dir(self) -> Path:
        return self.storage / self.run_name

    @property
    def eval_urls(self) -> str | list[str]:
        return self.cfg.eval.urls or self.data_urls

    @property
    def remote_dir(self) -> str | None:
        """The run's s3:// prefix when its storage is object storage, else None."""
        storage = self.cfg.trainer.storage_path
        return f"{storage.rstrip('/')}/{self.run_name}" if objstore.is_s3(storage) else None

    def config_dict(self) -> dict:
        """The completed config as it travels to workers, checkpoints and MLflow."""
        return asdict(self.cfg)

    def ray_storage(self) -> dict:
        """Ray Train's storage arguments: the local folder, or the S3 prefix through pyarrow's S3
        filesystem on the environment's endpoint (Ray wants the path without its scheme then)."""
        storage = self.cfg.trainer.storage_path
        if objstore.is_s3(storage):
            return {
                "storage_path": storage[len(objstore.S3) :].rstrip("/"),
                "storage_filesystem": objstore.pyarrow_fs(),
            }
        return {"storage_path": str(self.storage)}


def prepare(cfg: Config) -> RunPlan:
    """The checked plan of a run of `cfg`: a bad input fails here, before any expensive work."""
    os.environ.update(objstore.endpoint_env())  # MLflow's S3 store on boto3's endpoint (Ray inherits it)
    t = cfg.trainer
    # The random tail keeps apart runs of a parallel sweep that start in the same second.
    run_name = t.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    storage = local_storage(t.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    cfg = replace(
        cfg,
        data=replace(cfg.data, urls=absolute(cfg.data.urls)),
        eval=replace(cfg.eval, urls=absolute(cfg.eval.urls)),
    )
    urls = cfg.data.urls or builtin_shards(cfg, storage)
    urls = urls if isinstance(urls, str) else list(urls)
    cfg = check_data(cfg, urls)
    check_eval(cfg, cfg.eval.urls or urls)
    resume_from = check_resume(cfg, run_name)
    return RunPlan(
        cfg=cfg,
        run_name=run_name,
        storage=storage,
        data_urls=urls,
        resume_from=resume_from,
        # A resume takes G and D from the run's own checkpoint: init_from is not fetched again.
        init=None if resume_from else fetch_init(cfg, storage / run_name),
        tracking_uri=tracking.resolve_uri(cfg.tracking.uri),
        progress_bar=t.progress == "bar" or (t.progress == "auto" and sys.stdout.isatty()),
    )


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


def check_classes(cfg: Config, manifest: dict | None) -> Config:
    """A conditional model's class count, from the shards' manifest when not set."""
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
    num_classes = m.num_classes or len(classes)
    if num_classes < 2:
        raise UserError(f"model.conditional=true needs at least 2 classes; the shards have {num_classes}")
    return replace(cfg, model=replace(m, num_classes=num_classes))


def take_shape(cfg: Config, shape: tuple) -> Config:
    """model.channels / model.resolution = 0: the shards', then checked as if the user had set them."""
    m = cfg.model
    if len(shape) != 3 or (m.channels and m.resolution):
        return cfg
    m = replace(m, channels=m.channels or shape[0], resolution=m.resolution or shape[-1])
    try:
        m.check()
    except ConfigError as exc:
        raise UserError(f"{exc} (taken from the shards, which hold {shape} images)") from None
    return replace(cfg, model=m)


def fit_readers(cfg: Config, num_shards: int) -> Config:
    """Every reader (rank x loader worker) needs shards of its own to read each sample once per
    epoch: with too few shards, fewer loader workers per rank (said), or a clear error."""
    d, ranks = cfg.data, cfg.trainer.num_workers
    if d.resample or num_shards >= ranks * max(1, d.loader_workers):
        return cfg
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
    return replace(cfg, data=replace(d, loader_workers=num_shards // ranks))


def check_data(cfg: Config, urls: str | list) -> Config:
    """`cfg` completed from the shards at `urls`; fails before Ray starts when they are missing
    or do not fit the model."""
    try:
        shards = resolve(urls)
    except ShardSpecError as exc:
        raise UserError(f"data.urls: {exc}") from None
    cfg = fit_readers(cfg, len(shards.urls))
    for spec in (*cfg.data.decoders, *cfg.data.stages):
        try:
            load_callable(spec)
        except ShardSpecError as exc:
            raise UserError(f"data.stages / data.decoders: {exc}") from None
    if cfg.model.conditional:
        cfg = check_classes(cfg, shards.manifest)
    if shards.kind is None:
        if cfg.model.arch != "mlp" and not (cfg.model.resolution and cfg.model.channels):
            raise UserError(
                "model.resolution=0 / model.channels=0 take the size from the shards' manifest, and "
                "these shards have none: set model.resolution and model.channels"
            )
        return cfg  # no manifest: shapes are checked per sample while streaming
    want = "points" if cfg.model.arch == "mlp" else "image"
    if shards.kind != want:
        raise UserError(
            f"data.urls holds {shards.kind} samples but model.arch={cfg.model.arch} needs {want} samples; "
            f"use {'model=mlp' if shards.kind == 'points' else 'model=dcgan32 or model=dcgan64'}"
        )
    return check_image_shape(cfg, tuple(shards.sample_shape or ())) if want == "image" else cfg


def check_image_shape(cfg: Config, shape: tuple) -> Config:
    """The shards' image shape taken where the model leaves it open, then compared."""
    cfg = take_shape(cfg, shape)
    expected = (cfg.model.channels, cfg.model.resolution, cfg.model.resolution)
    if shape != expected:
        raise UserError(
            f"the shards hold {shape} images but the model expects {expected}: set "
            f"model.channels={shape[0]} model.resolution={shape[-1]}, or rebuild the shards "
            f"with make_shards channels={expected[0]} resolution={expected[-1]}"
        )
    return cfg


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
        features.load(
            feature_spec(cfg.eval, shards.manifest), cfg.eval.inception_weights, cfg.eval.inception_sha256
        )
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{exc} (or turn evaluation off: eval.at_end=false eval.every=0)") from None


def local_storage(storage_path: str) -> Path:
    """The run files' local folder: `storage_path` itself, or for s3:// a mirror under the cache
    (built-in datasets, the final weights and picture before upload, rollback checkpoints)."""
    if objstore.is_s3(storage_path):
        bucket, prefix = objstore.split(storage_path)
        return features.cache_root() / "storage" / bucket / prefix
    return Path(storage_path).expanduser().resolve()


def newest_checkpoint(cfg: Config, run_name: str) -> str | None:
    """This run's newest checkpoint holding a config (a folder, or an s3:// prefix), if any."""
    storage = cfg.trainer.storage_path
    if objstore.is_s3(storage):
        try:
            found = objstore.list_keys(f"{storage.rstrip('/')}/{run_name}/checkpoint_", "/config.json")
        except Exception as exc:  # noqa: BLE001 - boto3: no bucket, no credentials, no endpoint
            raise UserError(f"trainer.storage_path={storage}: cannot list it ({exc})") from None
        return found[-1].removesuffix("/config.json") if found else None
    previous = sorted((local_storage(storage) / run_name).glob("checkpoint_*/config.json"))
    return str(previous[-1].parent) if previous else None


def check_resume(cfg: Config, run_name: str) -> str | None:
    """The checkpoint the run resumes from (None: a new run); a resume that changes the model
    or data layout is refused."""
    newest = newest_checkpoint(cfg, run_name)
    if newest is None:
        return None
    if objstore.is_s3(newest):
        previous = json.loads(objstore.read_bytes(f"{newest}/config.json"))
    else:
        previous = checkpoint.load_config(Path(newest))
    try:
        checkpoint.check_compatible(previous, asdict(cfg))
    except checkpoint.CheckpointError as exc:
        raise UserError(f"trainer.run_name={run_name}: {exc}") from None
    return newest


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
