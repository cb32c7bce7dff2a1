"""The typed config tree: one dataclass per section, each value's default, allowed values and
checks beside it. Hydra composes it from `configs/` (whose files hold only what differs from
these defaults); everything below the entry points receives a checked `Config`.

A field's `metadata` holds its allowed values (`choices`) or its lower bound (`at_least`); a
section's `check()` applies them and its own rules, and `Config.check()` adds the rules that
span sections. Errors name the key, the value and the fix, before Ray, DeepSpeed or MLflow
start. (Choices are plain strings: OmegaConf 2.3 rejects `Literal` annotations, and its own
Enum errors would not name the fix.)
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NoReturn

__all__ = [
    "AUGMENT_POLICIES",
    "AugmentConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GuardConfig",
    "LossConfig",
    "ModelConfig",
    "TrackingKeys",
    "OptimConfig",
    "ParallelConfig",
    "PenaltyConfig",
    "RegistryConfig",
    "StabilityConfig",
    "TrackingConfig",
    "TrainerConfig",
    "TuneConfig",
    "allowed_keys",
    "dict_keys",
    "exit_on_config_error",
    "from_dict",
    "validate",
]


class ConfigError(ValueError):
    """A config value a user set is invalid; the message names the key and the fix."""


def exit_on_config_error(exc: ConfigError) -> NoReturn:
    """The command line's report of a bad config value: one line on stderr, exit status 2."""
    print(f"stablegan: config error: {exc}", file=sys.stderr)
    sys.exit(2)


def one_of(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices` (the default first among them or not)."""
    return field(default=default, metadata={"choices": choices})


def at_least(default: Any, low: float) -> Any:
    """A numeric field whose value must be >= `low`."""
    return field(default=default, metadata={"at_least": low})


def _fail_range(key: str, value: float, low: float, high: float, high_open: bool = True) -> None:
    ok = low < value < high if high_open else low < value <= high
    if not ok:
        raise ConfigError(
            f"{key}={value} is invalid; it must be in ({low}, {high}{')' if high_open else ']'}"
        )


def _check_fields(section: Any, prefix: str) -> None:
    """Each field's `choices` / `at_least` metadata, in declaration order."""
    for f in fields(section):
        value, key = getattr(section, f.name), f"{prefix}.{f.name}"
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(map(str, f.metadata["choices"]))
            raise ConfigError(f"{key}={value!r} is invalid; allowed values: {allowed}")
        if "at_least" in f.metadata and value < f.metadata["at_least"]:
            raise ConfigError(f"{key}={value} is invalid; it must be >= {f.metadata['at_least']}")


@dataclass
class ModelConfig:
    arch: str = one_of("mlp", "mlp", "dcgan", "resnet")  # mlp: 2-D points; dcgan, resnet: images
    latent_dim: int = at_least(16, 1)
    resolution: int = 32  # dcgan: 32 or 64; resnet: 32, 64, 128 or 256; 0 = the shards'
    channels: int = 1  # dcgan / resnet: 1 or 3, as the data has; 0 = the shards'
    g_width: int = at_least(256, 8)  # mlp: hidden units; dcgan: channels of the last feature map
    d_width: int = at_least(256, 8)
    depth: int = at_least(3, 1)  # mlp hidden layers
    spectral_norm: str = one_of("none", "none", "d", "both")  # d: every D layer; both: G too
    mbstd_group: int = at_least(0, 0)  # > 0: minibatch stddev feature in D over groups this size
    # mlp only, > 0: G is this many separate MLPs of width g_width; z[:, 0] picks one (so
    # latent_dim counts that coordinate). No path between experts' outputs: no mode bridges.
    g_experts: int = at_least(0, 0)
    # The experts' prior. Learned: G's loss also trains it (a score-function gradient), so the
    # mass per mode can balance when the experts do not divide evenly over the modes.
    g_expert_prior: str = one_of("uniform", "uniform", "learned")
    # dcgan / resnet: G with class-conditional batch norm, D a projection discriminator; the
    # labels come from the shards (their manifest's classes)
    conditional: bool = False
    num_classes: int = at_least(0, 0)  # conditional: 0 = as many as the shards' manifest lists
    # PacGAN (Lin et al. 2018): D scores this many samples at once, concatenated along channels
    # (1 = each sample alone); data.batch_size must be a multiple of it
    pack: int = at_least(1, 1)

    def check(self) -> None:
        if self.conditional and self.arch == "mlp":
            raise ConfigError(
                "model.conditional=true is for image models (model=dcgan32, resnet32, ...), not model.arch=mlp"
            )
        if self.arch in ("dcgan", "resnet"):
            sizes = (32, 64) if self.arch == "dcgan" else (32, 64, 128, 256)
            for key, value, allowed in [
                ("resolution", self.resolution, (0, *sizes)),
                ("channels", self.channels, (0, 1, 3)),
            ]:
                if value not in allowed:
                    raise ConfigError(
                        f"model.{key}={value!r} is invalid; allowed values: {', '.join(map(str, allowed))}"
                    )
        _check_fields(self, "model")  # first: a value out of its choices is the root cause
        if self.g_experts:
            self._check_experts()
        if self.pack > 1 and self.conditional:
            raise ConfigError(
                f"model.pack={self.pack} does not combine with model.conditional=true (a pack would "
                "mix classes): set model.pack=1 or model.conditional=false"
            )
        if self.g_expert_prior == "learned" and not self.g_experts:
            raise ConfigError(
                "model.g_expert_prior=learned needs an experts G: set model.g_experts (e.g. 50), or "
                "model.g_expert_prior=uniform"
            )

    def _check_experts(self) -> None:
        if self.arch != "mlp":
            raise ConfigError(
                f"model.g_experts={self.g_experts} is for model.arch=mlp (2-D points), not "
                f"{self.arch}: set model.g_experts=0"
            )
        if self.latent_dim < 2:
            raise ConfigError(
                f"model.g_experts needs model.latent_dim >= 2 (z[:, 0] picks the expert), got {self.latent_dim}"
            )
        if self.spectral_norm == "both":
            raise ConfigError(
                "model.spectral_norm=both does not cover an experts G (model.g_experts > 0): use "
                "model.spectral_norm=d"
            )


@dataclass
class LossConfig:
    # relativistic: RpGAN (Jolicoeur-Martineau 2019; R3GAN's loss), each real paired with a fake
    kind: str = one_of("nonsaturating", "nonsaturating", "hinge", "wasserstein", "lsgan", "relativistic")

    def check(self) -> None:
        _check_fields(self, "loss")


@dataclass
class PenaltyConfig:
    # r1: on reals; r2: on fakes; r1r2: both, one gamma (R3GAN); wgan_gp: on interpolates;
    # dragan: around reals
    kind: str = one_of("r1", "none", "r1", "r2", "r1r2", "wgan_gp", "dragan")
    # r1/r2/r1r2: gamma (term = gamma/2 * E|grad|^2); wgan_gp/dragan: lambda. auto: StyleGAN2-ADA's
    # heuristic gamma = 0.0002 * resolution^2 / global batch (images; 2-D points: resolution 1)
    weight: Any = 1.0
    # Set: the weight follows a cosine from `weight` to this over optim.schedule_steps (R3GAN)
    weight_end: float | None = None
    interval: int = at_least(1, 1)  # lazy regularization: every k D steps with gain k
    # D's cheaper double backward (trainer/gan/ops): on | off (PyTorch's own layers) | auto (on,
    # except the 2-D MLP's Linear layers: its presets were tuned with PyTorch's). Same values.
    fast_ops: str = one_of("auto", "auto", "on", "off")

    def check(self) -> None:
        _check_fields(self, "penalty")
        w = self.weight
        if w != "auto" and (isinstance(w, (bool, str)) or not isinstance(w, (int, float)) or w < 0):
            raise ConfigError(
                f"penalty.weight={w!r} is invalid; give a number >= 0 or auto (StyleGAN2-ADA's "
                "heuristic gamma from the resolution and batch)"
            )
        if self.weight_end is not None and self.weight_end < 0:
            raise ConfigError(f"penalty.weight_end={self.weight_end} is invalid; it must be >= 0")

    def gamma(self, resolution: int, global_batch: int) -> float:
        """The weight as a number: `auto` is 0.0002 * resolution^2 / global_batch (StyleGAN2-ADA's
        train.py, its `auto` config), resolution 1 for 2-D points."""
        if self.weight == "auto":
            return 0.0002 * max(resolution, 1) ** 2 / global_batch
        return float(self.weight)


AUGMENT_POLICIES = ("color", "translation", "cutout")  # trainer/gan/augment.py's transforms


@dataclass
class AugmentConfig:
    """What D sees (trainer/gan/augment.py): real and fake images both augmented, in D's step and
    G's step; samples never are."""

    # none | diffaugment (each transform with probability p) | ada (p steered by D's overfitting)
    kind: str = one_of("none", "none", "diffaugment", "ada")
    policy: str = "color,translation,cutout"  # comma-separated, applied in this order
    p: float = 1.0  # diffaugment: the probability; ada: where p starts (ADA starts at 0)
    ada_target: float = 0.6  # ada: p rises while r_t = E[sign D(real)] is above this, falls below
    ada_speed: float = at_least(100_000.0, 1.0)  # ada: images for p to move from 0 to 1

    def check(self) -> None:
        _check_fields(self, "augment")
        unknown = [t for t in self.transforms() if t not in AUGMENT_POLICIES]
        if unknown or not self.transforms():
            raise ConfigError(
                f"augment.policy={self.policy!r} is invalid; use a comma-separated list of "
                f"{', '.join(AUGMENT_POLICIES)}"
            )
        if not 0 <= self.p <= 1:
            raise ConfigError(f"augment.p={self.p} is invalid; a probability must be in [0, 1]")
        if not 0 < self.ada_target < 1:
            raise ConfigError(f"augment.ada_target={self.ada_target} is invalid; it must be in (0, 1)")

    def transforms(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.policy.split(",") if t.strip())


@dataclass
class OptimConfig:
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    d_steps: int = at_least(1, 1)  # D updates per G update
    grad_clip: float = at_least(0.0, 0.0)  # 0 = off
    ema_decay: float = 0.999  # EMA of G's weights; the EMA generator is sampled and registered
    # > 0: the EMA's half-life in thousands of images instead of ema_decay (StyleGAN2-ADA's
    # ema_kimg; decay per step = 0.5 ** (global batch / (ema_kimg * 1000)))
    ema_kimg: float = at_least(0.0, 0.0)
    # > 0 with ema_kimg: the half-life is at most this fraction of the images seen so far
    # (StyleGAN2-ADA's ema_rampup, e.g. 0.05), so the average forgets the early weights
    ema_rampup: float = at_least(0.0, 0.0)
    # linear / cosine: both lrs go from g_lr / d_lr to lr_final_scale times them over
    # schedule_steps, then stay
    lr_schedule: str = one_of("constant", "constant", "linear", "cosine")
    lr_final_scale: float = at_least(0.0, 0.0)
    beta2_end: float | None = None  # set: beta2 follows a cosine from beta2 to this (R3GAN: 0.9 -> 0.99)
    schedule_steps: int = at_least(0, 0)  # length of the lr / beta2 / penalty schedules; 0 = max_steps

    def check(self) -> None:
        _check_fields(self, "optim")
        for key in ("g_lr", "d_lr"):
            value = getattr(self, key)
            if not 0 < value < 1:
                raise ConfigError(f"optim.{key}={value} is invalid; a learning rate must be in (0, 1)")
        for key in ("beta1", "beta2", "ema_decay", "beta2_end"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"optim.{key}={value} is invalid; it must be in [0, 1)")
        if self.lr_final_scale > 1:
            raise ConfigError(
                f"optim.lr_final_scale={self.lr_final_scale} is invalid: the schedule ends at this "
                "fraction of g_lr / d_lr, in [0, 1]"
            )


@dataclass
class GuardConfig:
    """The stability guard (trainer/train/guard.py): triggers, interventions and their budget."""

    enabled: bool = False
    # |d_loss| or |g_loss| beyond this at any check, warm-up included (0 = off; not applied to
    # loss=wasserstein, whose critic values are unbounded): healthy runs of the bounded losses
    # stay within a few units
    max_loss: float = at_least(20.0, 0.0)
    loss_z: float = at_least(8.0, 0.0)  # d_loss or g_loss beyond this many EW std devs (0 = off) ...
    loss_rel: float = at_least(0.5, 0.0)  # ... and beyond this fraction of its EW mean
    d_saturation: float = 0.99  # D accuracy on reals and on fakes both at least this ...
    saturated_checks: int = at_least(3, 0)  # ... for this many checks in a row (0 = off)
    sn_growth: float = at_least(10.0, 0.0)  # top singular value of D beyond this x its first probe (0 = off)
    coverage_drop: float = at_least(0.5, 0.0)  # diversity below this x its best (0 = off)
    fid_rise: float = at_least(2.0, 0.0)  # in-training eval/fid above this x its best (0 = off)
    lr_factor: float = 0.5  # intervention: both learning rates times this per rollback
    penalty_factor: float = at_least(2.0, 1.0)  # intervention: the penalty weight times this per rollback
    add_r1: float = at_least(
        0.1, 0.0
    )  # a run without a penalty gets R1 with this gamma at its first rollback
    max_rollbacks: int = at_least(3, 0)  # budget; once spent the guard only watches and records
    reseed: bool = True  # new latent noise after a rollback, so the same bad luck is not replayed

    def check(self) -> None:
        _check_fields(self, "stability.guard")
        _fail_range("stability.guard.lr_factor", self.lr_factor, 0, 1, high_open=False)
        if 0 < self.fid_rise <= 1:
            raise ConfigError(
                f"stability.guard.fid_rise={self.fid_rise} is invalid: a rise is a factor above 1 "
                "(e.g. 2: FID doubled from its best), or 0 for off"
            )
        if self.enabled:
            _fail_range("stability.guard.d_saturation", self.d_saturation, 0, 1, high_open=False)


@dataclass
class StabilityConfig:
    every: int = at_least(100, 0)  # stability probe every this many steps (0 = off); train/probe.py
    power_iters: int = at_least(1, 1)  # power iterations per probe for the spectral norms
    samples: int = at_least(2500, 16)  # EMA samples for mode metrics (2-D) or diversity (images, <= 256)
    summary: bool = True  # end-of-run stability summary: MLflow tags + report artifacts
    guard: GuardConfig = field(default_factory=GuardConfig)

    def check(self) -> None:
        _check_fields(self, "stability")
        self.guard.check()


@dataclass
class DataConfig:
    urls: Any = ""  # brace pattern, list, folder or manifest; "" = build `builtin` under the run
    builtin: str = one_of(
        "grid25", "grid25", "ring8", "digits", "stacked_digits"
    )  # written on first use when urls is ""
    batch_size: int = at_least(256, 1)  # per worker
    loader_workers: int = at_least(2, 0)  # DataLoader processes per training worker
    shuffle: bool = True
    resample: bool = False
    hflip: bool = False
    verify: bool = True  # sha256 of every shard against its manifest before training
    audit: bool = False  # log which samples each rank read, per epoch (data_audit.json.gz in MLflow)
    shuffle_buffer: int = at_least(1000, 1)  # samples a reader holds to shuffle within a shard
    tar_reader: str = one_of("fast", "fast", "webdataset")  # fast: our plain-ustar header reader
    # An image claiming more pixels is skipped and counted (data_skipped) before it is inflated:
    # a few-KB file can claim a huge image. PIL's own decompression-bomb check stays on too.
    max_pixels: int = at_least(4096 * 4096, 1)
    # Your own webdataset stages, as 'package.module:function': `decoders` are decode handlers
    # f(".ext", bytes) -> value | None tried before ours; `stages` map each decoded sample (a
    # dict with the image as uint8 (C, H, W) under its extension) and may return None to drop it.
    decoders: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)

    def check(self) -> None:
        _check_fields(self, "data")
        for spec in (*self.decoders, *self.stages):
            module, _, name = spec.partition(":")
            if not module or not name:
                raise ConfigError(f"data stage {spec!r}: write it as 'package.module:function'")


@dataclass
class ParallelConfig:
    zero_stage: int = one_of(0, 0, 1, 2)  # ZeRO 3 fails in the penalties' double backward
    # fp32 | bf16 (bf16 weights, fp32 master copies) | fp16 (GPU, dynamic loss scaling) |
    # bf16_autocast (fp32 weights, bf16 compute under torch.autocast)
    precision: str = one_of("fp32", "fp32", "bf16", "fp16", "bf16_autocast")
    # torch.compile the G and D forwards, except the one a penalty differentiates twice
    # (AOTAutograd has no double backward): that one stays eager. Costs a compile at start.
    compile: bool = False

    def check(self) -> None:
        _check_fields(self, "parallel")


@dataclass
class TrainerConfig:
    num_workers: int = at_least(1, 1)
    use_gpu: bool = False
    cpus_per_worker: int = at_least(1, 1)
    # Extra Ray resources per training worker, e.g. {stablegan_slot: 1} to put each worker on
    # its own node (launch/local_cluster.sh gives every node one stablegan_slot).
    worker_resources: dict[str, float] = field(default_factory=dict)
    max_steps: int = at_least(1000, 1)  # G steps
    seed: int = 0
    log_every: int = at_least(50, 1)  # metrics to MLflow every this many steps
    sample_every: int = at_least(500, 0)  # sample grid / scatter plot every this many steps (0 = end only)
    checkpoint_every: int = at_least(250, 1)
    keep_checkpoints: int = at_least(2, 1)
    max_failures: int = at_least(2, 0)  # worker-group restarts from the last checkpoint before giving up
    run_name: str = ""  # same name + storage_path again = resume; "" = a new timestamped name
    # fine-tuning: models:/NAME@ALIAS (or /VERSION) starts G, and D when that run logged it, from
    # a registered version (same model.* settings); recorded as the run's lineage tags
    init_from: str = ""
    storage_path: str = "runs"  # a filesystem path every node sees (NFS/EFS on a cluster)
    torch_threads: int = at_least(0, 0)  # intra-op threads per worker; 0 = cpus_per_worker
    # console: a live bar with rate and ETA (auto: when the driver's stdout is a terminal) or a
    # line every log_every steps
    progress: str = one_of("auto", "auto", "bar", "lines")
    inject_nan_at: int = at_least(
        0, 0
    )  # fault drill: poison one batch with NaN at this step, once (0 = never)

    def check(self) -> None:
        _check_fields(self, "trainer")
        if self.init_from and not self.init_from.startswith("models:/"):
            raise ConfigError(
                f"trainer.init_from={self.init_from!r} is not a registered model: use models:/NAME@ALIAS "
                "or models:/NAME/VERSION"
            )
        if "://" in self.storage_path and not self.storage_path.startswith("s3://"):
            raise ConfigError(
                f"trainer.storage_path={self.storage_path!r} is invalid: give a filesystem path that every "
                "node sees (local disk on one machine, an NFS/EFS mount on a cluster) or s3://BUCKET/PREFIX "
                "(S3 or an S3-compatible server, credentials and AWS_ENDPOINT_URL from the environment)"
            )
        for key, amount in self.worker_resources.items():
            if key in ("CPU", "GPU") or amount <= 0:
                raise ConfigError(
                    f"trainer.worker_resources.{key}={amount} is invalid: give custom resources with a "
                    "positive amount; CPUs and GPUs come from trainer.cpus_per_worker and trainer.use_gpu"
                )
        if self.run_name and not all(c.isalnum() or c in "-_." for c in self.run_name):
            raise ConfigError(
                f"trainer.run_name={self.run_name!r} is invalid; use letters, digits, '-', '_' and '.'"
            )


@dataclass
class TrackingKeys:
    """The `tracking.*` key of the commands besides training (sample, evaluate, promote, register)."""

    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "stablegan"
    # Where a new experiment keeps its artifacts, e.g. s3://BUCKET/mlflow ("" = MLflow's default;
    # a server's --default-artifact-root or --artifacts-destination decides for its experiments)
    artifact_location: str = ""
    registered_model: str = "stablegan-generator"
    register: bool = True
    alias: str = "champion"  # moved to a new version only if it is better (registry.*); "" = never
    sample_grid: int = at_least(64, 1)  # images in a logged grid (points in a scatter: x40)
    flush_timeout: float = at_least(60.0, 0.0)  # at the end, seconds to wait for an unreachable server

    def check(self) -> None:
        _check_fields(self, "tracking")
        a = self.alias
        if a and (a == "latest" or re.fullmatch(r"v\d+", a) or not re.fullmatch(r"[\w-]+", a)):
            raise ConfigError(
                f"tracking.alias={a!r} is invalid: MLflow reserves 'latest' and 'v<N>'; use letters, "
                "digits, '-' and '_' (e.g. champion), or '' for no alias"
            )


@dataclass
class EvalConfig:
    """Image-quality and mode metrics (trainer/eval/); `python -m trainer.evaluate` takes the
    same keys."""

    every: int = at_least(0, 0)  # evaluate the EMA generator every this many steps (0 = off)
    # the real data to score against (shards as data.urls takes them); "" = the training data.
    # A held-out set here measures generalization, not memorization of a small training set.
    urls: Any = ""
    at_end: bool = True  # evaluate the final generator before registering it (promotion needs it)
    # digits | inception | a TorchScript path | pkg.module:factory; auto = digits for the digit
    # datasets, inception otherwise
    features: str = "auto"
    inception_weights: str = ""  # the FID Inception TorchScript; "" = download once, cached
    # the Inception file's sha256, checked before it loads; "" = the digest recorded at download
    # (no published digest exists: pin the one of the file you trust)
    inception_sha256: str = ""
    num: int = at_least(10_000, 16)  # generated samples per evaluation (and real ones, at most)
    during_num: int = at_least(2_000, 16)  # samples per evaluation during training (eval.every)
    mode_samples: int = at_least(26_000, 16)  # stacked digits: samples whose modes are counted
    batch_size: int = at_least(250, 1)
    nearest_k: int = at_least(5, 1)  # precision / recall / density / coverage neighbourhood
    kid_subsets: int = at_least(100, 1)  # KID's random subsets (of up to 1,000); 10 during training
    seed: int = 0  # latents of the generated samples
    cache_dir: str = ""  # real-data features; "" = $STABLEGAN_CACHE/real or ~/.cache/stablegan/real

    def check(self) -> None:
        _check_fields(self, "eval")
        if self.inception_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", self.inception_sha256):
            raise ConfigError(
                f"eval.inception_sha256={self.inception_sha256!r} is invalid; give the file's 64-hex "
                "sha256 (sha256sum inception-2015-12-05.pt) or leave it empty"
            )


@dataclass
class RegistryConfig:
    """Promotion: a new version gets `candidate_alias`; `tracking.alias` (the champion) moves to
    it only when it beats the champion on `primary` and no stability flag is raised."""

    # fid (FID, or FD-digits with eval.features=digits) and kid for images; mmd or swd (the
    # distances to fresh data draws) for 2-D; auto = fid for images, mmd for 2-D
    primary: str = one_of("auto", "auto", "fid", "kid", "mmd", "swd")
    min_improvement: float = at_least(0.0, 0.0)  # 0.05: lower by 5 % of the champion's |value|
    candidate_alias: str = "candidate"

    def check(self) -> None:
        _check_fields(self, "registry")
        if not re.fullmatch(r"[\w-]+", self.candidate_alias) or self.candidate_alias == "latest":
            raise ConfigError(
                f"registry.candidate_alias={self.candidate_alias!r} is invalid; use letters, digits, "
                "'-' and '_' (not 'latest')"
            )


@dataclass
class ClusterConfig:
    address: str = ""  # "" = start a local Ray on 127.0.0.1; "auto" or ray://HOST:PORT = connect
    num_cpus: int = 0  # local Ray only; 0 = all cores

    def check(self) -> None:
        pass


@dataclass
class TuneConfig:
    """A sweep (`stablegan tune`, trainer/services/sweep.py); training alone ignores it. Each
    trial is a whole run of the composed config with the searched keys set."""

    # key -> a distribution: loguniform(lo, hi), uniform(lo, hi), randint(lo, hi), choice(a, b,
    # ...) or grid(a, b, ...); any key training takes, e.g. optim.g_lr: loguniform(1e-4, 1e-2)
    space: dict[str, str] = field(default_factory=dict)
    num_samples: int = at_least(1, 1)  # draws of the space (each grid point is drawn this often)
    # asha: stops trials behind at a rung; fifo: every trial runs to its end; pbt: population-
    # based training (a lagging trial takes a leader's checkpoint over and perturbs its
    # settings). A diverged trial is stopped under each.
    scheduler: str = one_of("asha", "asha", "fifo", "pbt")
    max_concurrent: int = at_least(0, 0)  # trials at once; 0 = as many as the cluster's CPUs fit
    metric: str = "auto"  # auto = eval/mmd for 2-D points, eval/fid for images; lower is better
    grace_steps: int = at_least(0, 0)  # ASHA: no stop before this step; 0 = a quarter of max_steps
    reduction_factor: int = at_least(3, 2)  # ASHA: a rung keeps 1 / this of the trials
    perturbation_steps: int = at_least(0, 0)  # PBT: steps between exploits; 0 = a quarter of max_steps
    # When a trial counts as converged in the robustness report, at its last step: METRIC OP
    # VALUE over in-training metrics, e.g. eval/modes>=990 for stacked digits; "" = completed
    # without diverging
    converged: str = ""
    seed: int = 0  # the draws from the space (two sweeps with one seed start from the same settings)
    # Grid points run in an order drawn from `seed`: ASHA judges a trial at a rung only against
    # the trials that reached it before, so a grid walked as written (often worst to best)
    # would pass every trial. false = the written order.
    shuffle: bool = True
    name: str = ""  # "" = tune-<experiment>; the same name again resumes the sweep
    storage_path: str = "runs/tune"  # the sweep's state, trials' runs, table and best config

    def check(self) -> None:
        _check_fields(self, "tune")
        if "://" in self.storage_path:
            raise ConfigError(
                f"tune.storage_path={self.storage_path!r}: a sweep keeps its state and trials on a "
                "filesystem path (a shared mount on a cluster); object storage is not supported for sweeps"
            )
        if self.metric != "auto" and not self.metric.startswith("eval/"):
            raise ConfigError(
                f"tune.metric={self.metric!r} is invalid: a sweep ranks trials by an in-training "
                "evaluation metric, e.g. eval/fid, eval/kid or eval/mmd (or auto)"
            )


@dataclass
class Config:
    name: str = "grid25"  # experiment preset name, recorded with the run
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def check(self) -> Config:
        """Every section's own checks, then the rules that span sections; raises `ConfigError`
        naming the first bad key."""
        for section in (
            self.parallel,
            self.model,
            self.loss,
            self.penalty,
            self.augment,
            self.optim,
            self.data,
        ):
            section.check()
        for section in (
            self.trainer,
            self.stability,
            self.tracking,
            self.eval,
            self.registry,
            self.cluster,
            self.tune,
        ):
            section.check()
        self._check_compile()
        self._check_across()
        return self

    def _check_compile(self) -> None:
        if not self.parallel.compile:
            return
        if self.model.spectral_norm != "none":
            # The compiled power iteration saves the SN vectors for its backward, and a second
            # forward before that backward (the penalty's) updates them in place.
            raise ConfigError(
                f"parallel.compile=true does not work with model.spectral_norm={self.model.spectral_norm} "
                "yet (the compiled power iteration breaks the penalty's backward): set one of them off"
            )
        if not self.trainer.use_gpu and not (
            os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
        ):
            raise ConfigError(
                "parallel.compile=true on CPU needs a C++ compiler for torch.compile (g++ or clang++ "
                "on PATH, or $CXX): install one, or leave parallel.compile=false"
            )

    def _check_across(self) -> None:
        t = self.trainer
        if self.stability.guard.enabled and t.checkpoint_every % t.log_every:
            raise ConfigError(
                f"stability.guard.enabled needs trainer.checkpoint_every={t.checkpoint_every} to be "
                f"a multiple of trainer.log_every={t.log_every}: a checkpoint counts as healthy only "
                "when the guard has checked the steps before it"
            )
        if self.augment.kind != "none" and self.model.arch == "mlp":
            raise ConfigError(
                f"augment={self.augment.kind} transforms images; model.arch=mlp trains on 2-D points: "
                "use augment=none"
            )
        g, pack = self.model.mbstd_group, self.model.pack
        if g and self.data.batch_size % (g * pack):
            raise ConfigError(
                f"model.mbstd_group={g} (times model.pack={pack}) must divide data.batch_size="
                f"{self.data.batch_size}, so that no minibatch-stddev group mixes real and generated samples"
            )
        if self.data.batch_size % pack:
            raise ConfigError(
                f"model.pack={pack} must divide data.batch_size={self.data.batch_size} (D scores packs "
                "of that many samples): change one of them"
            )
        if self.parallel.precision == "fp16" and not t.use_gpu:
            raise ConfigError(
                "parallel.precision=fp16 needs trainer.use_gpu=true (DeepSpeed's fp16 loss scaling is "
                "GPU-only); use parallel.precision=bf16, bf16_autocast or fp32 on CPU"
            )


def validate(cfg: Config) -> Config:
    """`cfg.check()`: every user-facing value checked, or `ConfigError` naming the first bad key."""
    return cfg.check()


def from_dict(data: dict) -> Config:
    """A `Config` from the nested dict form that travels to Ray workers and checkpoints; a key
    the schema does not have is a `ConfigError` naming the allowed ones."""

    def build(cls: type, values: dict) -> Any:
        names = [f.name for f in fields(cls)]
        unknown = set(values) - set(names)
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in {cls.__name__}; allowed: {names}")
        kwargs = {}
        for f in fields(cls):
            if f.name in values:
                v, sub = values[f.name], _section_type(f)
                kwargs[f.name] = build(sub, v) if sub is not None and isinstance(v, dict) else v
        return cls(**kwargs)

    return build(Config, data)


def _section_type(f: Any) -> type | None:
    return f.default_factory if is_dataclass(f.default_factory) else None


def allowed_keys(path: str) -> list[str] | None:
    """Keys allowed under a dotted `path` of the schema (None if `path` is a leaf or unknown)."""
    cls: Any = Config
    for part in [p for p in path.split(".") if p]:
        match = {f.name: f for f in fields(cls)}.get(part)
        if match is None or _section_type(match) is None:
            return None
        cls = match.default_factory
    return [f.name for f in fields(cls)]


def dict_keys() -> set[str]:
    """Dotted paths of the schema's free-form dict fields (e.g. trainer.worker_resources)."""
    return {
        f"{section.name}.{f.name}"
        for section in fields(Config)
        if _section_type(section) is not None
        for f in fields(section.default_factory)
        if f.default_factory is dict
    }
