"""Config composition and validation: unknown keys and bad values fail early and clearly."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import MISSING

import pytest

from trainer.config import ConfigError
from trainer.main import compose

PRESETS = ["grid25", "ring8", "digits32", "dcgan64_gpu", "stable_images", "images"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_validate(preset):
    cfg = compose([f"experiment={preset}"])
    assert cfg.name == preset
    assert cfg.model.arch == ("mlp" if preset in ("grid25", "ring8") else "dcgan")


@pytest.mark.parametrize("resolution,channels", [(32, 1), (64, 3)])
def test_stable_images_takes_its_architecture_from_the_shards(tmp_path, resolution, channels):
    from data_pipeline.make_shards import MakeShardsConfig, write_shards
    from trainer.services.plan import check_data

    out = tmp_path / "shards"
    mcfg = MakeShardsConfig(
        source="digits", out=str(out), resolution=resolution, channels=channels, fraction=0.02
    )
    write_shards(mcfg, progress=False)
    cfg = compose(["experiment=stable_images", f"data.urls={out}"])
    assert (cfg.model.resolution, cfg.model.channels) == (0, 0)  # not known until the data is
    cfg = check_data(cfg, str(out))
    assert (cfg.model.arch, cfg.model.resolution, cfg.model.channels) == ("dcgan", resolution, channels)


def test_a_shard_size_the_model_cannot_take_names_both(tmp_path):
    from data_pipeline.make_shards import MakeShardsConfig, write_shards
    from trainer.services.plan import UserError, check_data

    out = tmp_path / "shards"
    write_shards(
        MakeShardsConfig(source="digits", out=str(out), resolution=48, fraction=0.02), progress=False
    )
    cfg = compose(["experiment=stable_images", f"data.urls={out}"])
    with pytest.raises(
        UserError, match=r"model.resolution=48 is invalid; allowed values: 0, 32, 64 .*\(1, 48, 48\)"
    ):
        check_data(cfg, str(out))


def test_user_facing_keys_override():
    cfg = compose(
        [
            "trainer.num_workers=2",
            "trainer.use_gpu=false",
            "trainer.max_steps=7",
            "trainer.seed=3",
            "data.urls=shards/x-{000000..000003}.tar",
            "tracking.uri=http://127.0.0.1:5000",
            "tracking.registered_model=faces",
            "parallel=cpu_bf16",
            "penalty=wgan_gp",
        ]
    )
    assert (cfg.trainer.num_workers, cfg.trainer.max_steps, cfg.trainer.seed) == (2, 7, 3)
    assert cfg.data.urls.endswith(".tar") and cfg.tracking.registered_model == "faces"
    assert cfg.parallel.precision == "bf16" and cfg.penalty.kind == "wgan_gp" and cfg.penalty.weight == 10.0
    # The autocast mode composes and validates on a CPU too (no GPU-only loss scaling).
    assert compose(["parallel=gpu_bf16_autocast"]).parallel.precision == "bf16_autocast"


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.num_wokers=2", "unknown key 'trainer.num_wokers'; allowed keys in trainer: num_workers"),
        ("bogus=1", "unknown key 'bogus'; config groups: model"),
        ("parallel.zero_stage=3", "parallel.zero_stage=3 is invalid; allowed values: 0, 1, 2"),
        ("parallel.precision=fp8", "allowed values: fp32, bf16, fp16, bf16_autocast"),
        ("parallel.precision=fp16", "needs trainer.use_gpu=true"),
        (
            "loss.kind=bce",
            "loss.kind='bce' is invalid; allowed values: nonsaturating, hinge, wasserstein, lsgan",
        ),
        ("trainer.num_workers=0", "trainer.num_workers=0 is invalid; it must be >= 1"),
        ("optim.g_lr=2", "optim.g_lr=2.0 is invalid; a learning rate must be in (0, 1)"),
        ("trainer.run_name=a/b", "trainer.run_name='a/b' is invalid"),
        ("trainer.storage_path=gs://bucket/runs", "or s3://BUCKET/PREFIX"),
        ("trainer.worker_resources={GPU:1}", "trainer.worker_resources.GPU=1.0 is invalid"),
        ("trainer.worker_resources.slot=0", "trainer.worker_resources.slot=0.0 is invalid"),
        ("tracking.alias=latest", "MLflow reserves 'latest'"),
        ("tracking.alias=v3", "MLflow reserves 'latest' and 'v<N>'"),
        ("stability.guard.lr_factor=0", "stability.guard.lr_factor=0.0 is invalid; it must be in (0, 1]"),
        ("stability.guard.bogus=1", "unknown key 'stability.guard.bogus'; allowed keys in stability.guard"),
        ("trainer.inject_nan_at=-1", "trainer.inject_nan_at=-1 is invalid"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose([override])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=dcgan32", "model.g_experts=4"], "model.g_experts=4 is for model.arch=mlp"),
        (["model.latent_dim=1", "model.g_experts=4"], "model.g_experts needs model.latent_dim >= 2"),
        (["model.spectral_norm=both", "model.g_experts=4"], "model.spectral_norm=both does not cover"),
        (["model.g_experts=-1"], "model.g_experts=-1 is invalid; it must be >= 0"),
        (["model.g_expert_prior=learned"], "model.g_expert_prior=learned needs an experts G"),
        (["model.g_experts=4", "model.g_expert_prior=dirichlet"], "allowed values: uniform, learned"),
    ],
)
def test_bad_experts_generator_settings_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(["experiment=grid25", *overrides])  # grid25: one MLP G (the default has experts)


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "model.arch=gan"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.arch='gan' is invalid; allowed values: mlp, dcgan" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", "model=gan"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0 and "Available options in 'model'" in proc.stderr


def test_worker_resources_take_new_keys_and_brace_patterns_stay_text():
    cfg = compose(["trainer.worker_resources={stablegan_slot:1}", "trainer.worker_resources.gpu_a100=0.5"])
    assert cfg.trainer.worker_resources == {"stablegan_slot": 1.0, "gpu_a100": 0.5}
    cfg = compose(["data.urls=/s/x-{000000..000003}.tar", "data.verify=false"])
    assert cfg.data.urls == "/s/x-{000000..000003}.tar"
    assert compose(["tracking.alias="]).tracking.alias == ""


def test_guard_needs_checkpoints_on_checked_steps():
    assert compose(["stability=guarded"]).stability.guard.enabled
    with pytest.raises(ConfigError, match="multiple of trainer.log_every=50"):
        compose(["experiment=grid25", "stability=guarded", "trainer.checkpoint_every=75"])


def test_compile_needs_a_compiler_and_no_spectral_norm(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    assert compose(["parallel.compile=true"]).parallel.compile
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match=r"parallel.compile=true on CPU needs a C\+\+ compiler"):
        compose(["parallel.compile=true"])
    assert compose(["parallel.compile=true", "trainer.use_gpu=true"]).parallel.compile  # GPUs use triton
    with pytest.raises(ConfigError, match="does not work with model.spectral_norm=d"):
        compose(["parallel.compile=true", "model.spectral_norm=d"])


def restated_defaults(config_dir) -> list[str]:
    """Values in `config_dir`'s group files that change nothing: each file's own values are
    removed in a copy of the tree and the config composed again with that file selected; a value
    the rest of the tree already gives (the schema's default, or the groups a preset selects)
    is a restatement."""
    import shutil
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainer.config import dict_keys
    from trainer.main import to_config

    free_form = dict_keys()  # a dict field (tune.space) is one value: its keys may hold dots

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in free_form:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    found = []
    for path in sorted(Path(config_dir).glob("*/*.yaml")):
        group, option = path.parent.name, path.stem
        body = {
            k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k not in ("defaults", "name")
        }
        if not body:
            continue
        prefix = "" if group == "experiment" else f"{group}."
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "configs"
            shutil.copytree(config_dir, copy)
            kept = [
                line
                for line in path.read_text().splitlines(keepends=True)
                if line.startswith(("#", "defaults", "  -", "name"))
            ]
            (copy / group / path.name).write_text("".join(kept))
            with initialize_config_dir(config_dir=str(copy), version_base="1.3"):
                # A group file is read against the schema alone (no preset on top of it).
                others = [] if group == "experiment" else ["~experiment"]
                without = asdict(to_config(hydra_compose("config", overrides=[*others, f"{group}={option}"])))
        for key, value in leaves(body, prefix):
            node = without
            for part in key.split("."):
                node = node[part]
            if node == value:
                found.append(f"{group}/{path.name}: {key}={value!r}")
    return found


def test_no_preset_restates_a_default():
    """configs/ holds only what differs from the schema (and from the groups a preset selects):
    one source per default."""
    from trainer.main import CONFIG_DIR

    assert restated_defaults(CONFIG_DIR) == []


def test_a_restated_default_is_caught(tmp_path):
    import shutil

    from trainer.main import CONFIG_DIR

    copy = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, copy)
    with open(copy / "experiment" / "grid25.yaml", "a") as f:
        f.write("penalty:\n  interval: 1\n")  # the schema's default
    with open(copy / "model" / "dcgan32.yaml", "a") as f:
        f.write("depth: 3\n")
    assert restated_defaults(copy) == [
        "experiment/grid25.yaml: penalty.interval=1",
        "model/dcgan32.yaml: model.depth=3",
    ]


def test_every_config_group_is_known_to_the_checks():
    """The CLI's early checks take each folder of configs/ as a group (augment included), so
    `GROUP=OPTION` passes them and composes."""
    from trainer.config.overrides import GROUPS, check_overrides
    from trainer.main import CONFIG_DIR

    folders = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
    assert sorted(GROUPS) == folders and "augment" in GROUPS
    for group in folders:
        option = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))[0]
        check_overrides([f"{group}={option}"])
    assert compose(["experiment=digits32", "augment=ada"]).augment.kind == "ada"
    with pytest.raises(ConfigError, match="config groups: model, loss, penalty, augment"):
        check_overrides(["augmnt=ada"])


def test_the_stream_and_the_data_section_default_alike():
    """StreamConfig (usable on its own) takes its defaults from the data section; a default
    written there again by hand would drift, and this catches it."""
    from dataclasses import fields

    from data_pipeline.stream import StreamConfig
    from trainer.config import DataConfig

    same = {"loader_workers": "num_workers", "shuffle": "shuffle", "resample": "resample", "hflip": "hflip"}
    same |= {k: k for k in ("verify", "shuffle_buffer", "tar_reader", "max_pixels", "decoders", "stages")}
    stream = {f.name: f for f in fields(StreamConfig)}
    for ours, theirs in same.items():
        f = stream[theirs]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        assert getattr(DataConfig(), ours) == default, (ours, theirs)
