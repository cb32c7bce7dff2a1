"""The typed config tree. Hydra composes it from `configs/`; everything below `main` gets a `Config`.

`validate` is the one place where values are checked; its errors name the key, the value and
what is allowed, and it runs before Ray, DeepSpeed or MLflow start.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NoReturn

ARCHS = ("mlp", "dcgan", "resnet")
SPECTRAL_NORM = ("none", "d", "both")
LR_SCHEDULES = ("constant", "linear")
LOSSES = ("nonsaturating", "hinge", "wasserstein", "lsgan")
PENALTIES = ("none", "r1", "r2", "wgan_gp", "dragan")
PRECISIONS = ("fp32", "bf16", "fp16", "bf16_autocast")
ZERO_STAGES = (0, 1, 2)
EXPERT_PRIORS = ("uniform", "learned")
BUILTINS = ("grid25", "ring8", "digits")
RESOLUTIONS = (32, 64)


class ConfigError(ValueError):
    """A config value a user set is invalid; the message names the key and the fix."""


def exit_on_config_error(exc: ConfigError) -> NoReturn:
    """The command line's report of a bad config value: one line on stderr, exit status 2."""
    print(f"stablegan: config error: {exc}", file=sys.stderr)
    sys.exit(2)


@dataclass
class ModelConfig:
    arch: str = "mlp"  # mlp (2-D points) | dcgan | resnet (images, SNGAN-style)
    latent_dim: int = 16
    resolution: int = 32  # dcgan only: 32 or 64
    channels: int = 1  # dcgan only: must match the data
    g_width: int = 256  # mlp: hidden units; dcgan: channels of the last feature map (x8 at 4x4)
    d_width: int = 256
    depth: int = 3  # mlp hidden layers
    spectral_norm: str = "none"  # none | d (every D layer) | both
    mbstd_group: int = 0  # > 0: minibatch stddev feature in D over groups of this many samples
    # mlp only, > 0: G is this many separate MLPs of width g_width; z[:, 0] picks one (so
    # latent_dim counts that coordinate). No path between experts' outputs: no mode bridges.
    g_experts: int = 0
    # uniform | learned: the experts' prior. Learned, G's loss also trains it (a score-function
    # gradient), so the mass per mode can balance when the experts do not divide evenly.
    g_expert_prior: str = "uniform"


@dataclass
class LossConfig:
    kind: str = "nonsaturating"


@dataclass
class PenaltyConfig:
    kind: str = (
        "r1"  # none | r1 (on reals) | r2 (on fakes) | wgan_gp (on interpolates) | dragan (around reals)
    )
    weight: float = 1.0  # r1/r2: gamma (term = gamma/2 * E|grad|^2); wgan_gp/dragan: lambda
    interval: int = 1  # lazy regularization: every k D steps with gain k


@dataclass
class OptimConfig:
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    d_steps: int = 1  # D updates per G update
    grad_clip: float = 0.0  # 0 = off
    ema_decay: float = 0.999  # EMA of G's weights; the EMA generator is sampled and registered
    lr_schedule: str = "constant"  # constant | linear (both lrs decay linearly to 0 at max_steps)


@dataclass
class GuardConfig:
    """The stability guard (trainer/guard.py): triggers, interventions and their budget."""

    enabled: bool = False
    loss_z: float = 8.0  # d_loss or g_loss beyond this many EW standard deviations (0 = off) ...
    loss_rel: float = 0.5  # ... and beyond this fraction of its EW mean (averaged losses vary little)
    d_saturation: float = 0.99  # D accuracy on reals and on fakes both at least this ...
    saturated_checks: int = 3  # ... for this many checks in a row (0 = off)
    sn_growth: float = 10.0  # top singular value of D beyond this x its first probe (0 = off)
    coverage_drop: float = 0.5  # modes covered (2-D) or diversity below this x its best (0 = off)
    lr_factor: float = 0.5  # intervention: both learning rates times this per rollback
    penalty_factor: float = 2.0  # intervention: the penalty weight times this per rollback
    add_r1: float = 0.1  # a run without a penalty gets R1 with this gamma at its first rollback (0 = no)
    max_rollbacks: int = 3  # budget; once spent the guard only watches and records
    reseed: bool = True  # new latent noise after a rollback, so the same bad luck is not replayed


@dataclass
class StabilityConfig:
    every: int = 100  # stability probe every this many steps (0 = off); see trainer/stability.py
    power_iters: int = 1  # power iterations per probe for the spectral norms
    samples: int = 2500  # EMA samples for mode metrics (2-D) or diversity (images, <= 256)
    summary: bool = True  # end-of-run stability summary: MLflow tags + report artifacts
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class DataConfig:
    urls: Any = ""  # brace pattern, list, folder or manifest; "" = build `builtin` under the run
    builtin: str = "grid25"  # grid25 | ring8 | digits, written on first use when urls is ""
    batch_size: int = 256  # per worker
    loader_workers: int = 2  # DataLoader processes per training worker
    shuffle: bool = True
    resample: bool = False
    hflip: bool = False
    verify: bool = True  # sha256 of every shard against its manifest before training
    audit: bool = False  # log which samples each rank read, per epoch (data_audit.json.gz in MLflow)


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    # fp32 | bf16 (CPU or GPU; bf16 weights, fp32 master copies) | fp16 (GPU, dynamic loss
    # scaling) | bf16_autocast (fp32 weights, bf16 compute under torch.autocast)
    precision: str = "fp32"
    # torch.compile the G and D forwards, except the one a penalty differentiates twice
    # (AOTAutograd has no double backward): that one stays eager. Costs a compile at start.
    compile: bool = False


@dataclass
class TrainerConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Extra Ray resources per training worker, e.g. {stablegan_slot: 1} to put each worker on
    # its own node (launch/local_cluster.sh gives every node one stablegan_slot).
    worker_resources: dict[str, float] = field(default_factory=dict)
    max_steps: int = 1000  # G steps
    seed: int = 0
    log_every: int = 50  # metrics to MLflow every this many steps
    sample_every: int = 500  # sample grid / scatter plot every this many steps (0 = end only)
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up
    run_name: str = ""  # same name + storage_path again = resume; "" = a new timestamped name
    storage_path: str = "runs"  # a filesystem path every node sees (NFS/EFS on a cluster)
    torch_threads: int = 0  # intra-op threads per worker; 0 = cpus_per_worker
    inject_nan_at: int = 0  # fault drill: poison one batch with NaN at this step, once (0 = never)


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "stablegan"
    registered_model: str = "stablegan-generator"
    register: bool = True
    alias: str = "champion"  # moved to each newly registered version ("" = leave aliases alone)
    sample_grid: int = 64  # images in a logged grid (points in a scatter: x40)
    flush_timeout: float = (
        60.0  # at the end, seconds to wait for an unreachable server to take what is buffered
    )


@dataclass
class ClusterConfig:
    address: str = ""  # "" = start a local Ray on 127.0.0.100; "auto" or ray://HOST:PORT = connect
    num_cpus: int = 0  # local Ray only; 0 = all cores


@dataclass
class Config:
    name: str = "grid25"  # experiment preset name, recorded with the run
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; allowed values: {', '.join(map(str, allowed))}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} is invalid; it must be >= {low}")


def validate(cfg: Config) -> Config:
    """Check every user-facing value; raise `ConfigError` naming the first bad key."""
    _choice("model.arch", cfg.model.arch, ARCHS)
    _choice("loss.kind", cfg.loss.kind, LOSSES)
    _choice("penalty.kind", cfg.penalty.kind, PENALTIES)
    _choice("parallel.precision", cfg.parallel.precision, PRECISIONS)
    _choice("parallel.zero_stage", cfg.parallel.zero_stage, ZERO_STAGES)
    _choice("data.builtin", cfg.data.builtin, BUILTINS)
    _choice("model.spectral_norm", cfg.model.spectral_norm, SPECTRAL_NORM)
    _choice("optim.lr_schedule", cfg.optim.lr_schedule, LR_SCHEDULES)
    if cfg.model.arch in ("dcgan", "resnet"):
        _choice("model.resolution", cfg.model.resolution, RESOLUTIONS)
        _choice("model.channels", cfg.model.channels, (1, 3))
    for key, value, low in [
        ("model.latent_dim", cfg.model.latent_dim, 1),
        ("model.g_width", cfg.model.g_width, 8),
        ("model.d_width", cfg.model.d_width, 8),
        ("model.depth", cfg.model.depth, 1),
        ("model.mbstd_group", cfg.model.mbstd_group, 0),
        ("model.g_experts", cfg.model.g_experts, 0),
        ("stability.every", cfg.stability.every, 0),
        ("stability.power_iters", cfg.stability.power_iters, 1),
        ("stability.samples", cfg.stability.samples, 16),
        ("penalty.weight", cfg.penalty.weight, 0.0),
        ("penalty.interval", cfg.penalty.interval, 1),
        ("optim.d_steps", cfg.optim.d_steps, 1),
        ("optim.grad_clip", cfg.optim.grad_clip, 0.0),
        ("data.batch_size", cfg.data.batch_size, 1),
        ("data.loader_workers", cfg.data.loader_workers, 0),
        ("trainer.num_workers", cfg.trainer.num_workers, 1),
        ("trainer.cpus_per_worker", cfg.trainer.cpus_per_worker, 1),
        ("trainer.max_steps", cfg.trainer.max_steps, 1),
        ("trainer.log_every", cfg.trainer.log_every, 1),
        ("trainer.sample_every", cfg.trainer.sample_every, 0),
        ("trainer.checkpoint_every", cfg.trainer.checkpoint_every, 1),
        ("trainer.keep_checkpoints", cfg.trainer.keep_checkpoints, 1),
        ("trainer.max_failures", cfg.trainer.max_failures, 0),
        ("trainer.torch_threads", cfg.trainer.torch_threads, 0),
        ("trainer.inject_nan_at", cfg.trainer.inject_nan_at, 0),
        ("stability.guard.loss_z", cfg.stability.guard.loss_z, 0.0),
        ("stability.guard.loss_rel", cfg.stability.guard.loss_rel, 0.0),
        ("stability.guard.saturated_checks", cfg.stability.guard.saturated_checks, 0),
        ("stability.guard.sn_growth", cfg.stability.guard.sn_growth, 0.0),
        ("stability.guard.coverage_drop", cfg.stability.guard.coverage_drop, 0.0),
        ("stability.guard.penalty_factor", cfg.stability.guard.penalty_factor, 1.0),
        ("stability.guard.add_r1", cfg.stability.guard.add_r1, 0.0),
        ("stability.guard.max_rollbacks", cfg.stability.guard.max_rollbacks, 0),
        ("tracking.sample_grid", cfg.tracking.sample_grid, 1),
        ("tracking.flush_timeout", cfg.tracking.flush_timeout, 0.0),
    ]:
        _at_least(key, value, low)
    if cfg.model.g_experts:
        if cfg.model.arch != "mlp":
            raise ConfigError(
                f"model.g_experts={cfg.model.g_experts} is for model.arch=mlp (2-D points), not "
                f"{cfg.model.arch}: set model.g_experts=0"
            )
        if cfg.model.latent_dim < 2:
            raise ConfigError(
                f"model.g_experts needs model.latent_dim >= 2 (z[:, 0] picks the expert), got "
                f"{cfg.model.latent_dim}"
            )
        if cfg.model.spectral_norm == "both":
            raise ConfigError(
                "model.spectral_norm=both does not cover an experts G (model.g_experts > 0): use "
                "model.spectral_norm=d"
            )
    _choice("model.g_expert_prior", cfg.model.g_expert_prior, EXPERT_PRIORS)
    if cfg.model.g_expert_prior == "learned" and not cfg.model.g_experts:
        raise ConfigError(
            "model.g_expert_prior=learned needs an experts G: set model.g_experts (e.g. 50), or "
            "model.g_expert_prior=uniform"
        )
    if cfg.parallel.compile and cfg.model.spectral_norm != "none":
        # Measured: the compiled power iteration saves the SN vectors for its backward, and a
        # second forward before that backward (the penalty's) updates them in place.
        raise ConfigError(
            f"parallel.compile=true does not work with model.spectral_norm={cfg.model.spectral_norm} "
            "yet (the compiled power iteration breaks the penalty's backward): set one of them off"
        )
    if cfg.parallel.compile and not cfg.trainer.use_gpu:
        if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
            raise ConfigError(
                "parallel.compile=true on CPU needs a C++ compiler for torch.compile (g++ or clang++ "
                "on PATH, or $CXX): install one, or leave parallel.compile=false"
            )
    for key, value in [("optim.g_lr", cfg.optim.g_lr), ("optim.d_lr", cfg.optim.d_lr)]:
        if not 0 < value < 1:
            raise ConfigError(f"{key}={value} is invalid; a learning rate must be in (0, 1)")
    for key, value in [
        ("optim.beta1", cfg.optim.beta1),
        ("optim.beta2", cfg.optim.beta2),
        ("optim.ema_decay", cfg.optim.ema_decay),
    ]:
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value} is invalid; it must be in [0, 1)")
    guard = cfg.stability.guard
    if not 0 < guard.lr_factor <= 1:
        raise ConfigError(f"stability.guard.lr_factor={guard.lr_factor} is invalid; it must be in (0, 1]")
    if guard.enabled and cfg.trainer.checkpoint_every % cfg.trainer.log_every:
        raise ConfigError(
            f"stability.guard.enabled needs trainer.checkpoint_every={cfg.trainer.checkpoint_every} to be "
            f"a multiple of trainer.log_every={cfg.trainer.log_every}: a checkpoint counts as healthy only "
            "when the guard has checked the steps before it"
        )
    if guard.enabled and not 0 < guard.d_saturation <= 1:
        raise ConfigError(
            f"stability.guard.d_saturation={guard.d_saturation} is invalid; it must be in (0, 1]"
        )
    g = cfg.model.mbstd_group
    if g and cfg.data.batch_size % g:
        raise ConfigError(
            f"model.mbstd_group={g} must divide data.batch_size={cfg.data.batch_size}, so that no "
            "minibatch-stddev group mixes real and generated samples"
        )
    if cfg.parallel.precision == "fp16" and not cfg.trainer.use_gpu:
        raise ConfigError(
            "parallel.precision=fp16 needs trainer.use_gpu=true (DeepSpeed's fp16 loss scaling is GPU-only); "
            "use parallel.precision=bf16, bf16_autocast or fp32 on CPU"
        )
    if "://" in cfg.trainer.storage_path:
        raise ConfigError(
            f"trainer.storage_path={cfg.trainer.storage_path!r} is invalid: checkpoints, datasets and "
            "weights need a filesystem path that every node sees (local disk on one machine, an NFS/EFS "
            "mount on a cluster); object-store URLs are not supported yet"
        )
    for key, amount in cfg.trainer.worker_resources.items():
        if key in ("CPU", "GPU") or amount <= 0:
            raise ConfigError(
                f"trainer.worker_resources.{key}={amount} is invalid: give custom resources with a "
                "positive amount; CPUs and GPUs come from trainer.cpus_per_worker and trainer.use_gpu"
            )
    alias = cfg.tracking.alias
    if alias and (alias == "latest" or re.fullmatch(r"v\d+", alias) or not re.fullmatch(r"[\w-]+", alias)):
        raise ConfigError(
            f"tracking.alias={alias!r} is invalid: MLflow reserves 'latest' and 'v<N>'; use letters, "
            "digits, '-' and '_' (e.g. champion), or '' for no alias"
        )
    if cfg.trainer.run_name and not all(c.isalnum() or c in "-_." for c in cfg.trainer.run_name):
        raise ConfigError(
            f"trainer.run_name={cfg.trainer.run_name!r} is invalid; use letters, digits, '-', '_' and '.'"
        )
    return cfg


def from_dict(data: dict) -> Config:
    """Build a `Config` from the nested dict form that travels to Ray workers and checkpoints."""

    def build(cls: type, values: dict) -> Any:
        kwargs = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            sub = f.default_factory if is_dataclass(f.default_factory) else None  # type: ignore[arg-type]
            kwargs[f.name] = build(sub, v) if sub is not None and isinstance(v, dict) else v
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown key(s) {sorted(unknown)} in {cls.__name__}; allowed: {[f.name for f in fields(cls)]}"
            )
        return cls(**kwargs)

    return build(Config, data)


def allowed_keys(path: str) -> list[str] | None:
    """Keys allowed under a dotted `path` of the schema (None if `path` is a leaf or unknown)."""
    cls: Any = Config
    for part in [p for p in path.split(".") if p]:
        match = {f.name: f for f in fields(cls)}.get(part)
        if match is None or not is_dataclass(match.default_factory):  # type: ignore[arg-type]
            return None
        cls = match.default_factory
    return [f.name for f in fields(cls)]


def dict_keys() -> set[str]:
    """Dotted paths of the schema's free-form dict fields (e.g. trainer.worker_resources)."""
    out = set()
    for section in fields(Config):
        if is_dataclass(section.default_factory):  # type: ignore[arg-type]
            out |= {
                f"{section.name}.{f.name}"
                for f in fields(section.default_factory)  # type: ignore[arg-type]
                if f.default_factory is dict
            }
    return out
