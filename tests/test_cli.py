"""One CLI: `stablegan COMMAND` runs every entry point, and the commands name the same things
alike (`tracking.uri`, `data.urls`, `eval.*`) as training does."""

from __future__ import annotations

import subprocess

import pytest

from data_pipeline.make_shards import TRAINING_KEYS, MakeShardsConfig
from tests.conftest import BIN
from trainer.config.cli import parse_overrides
from trainer.evaluate import EvaluateConfig
from trainer.main import compose
from trainer.promote import PromoteConfig
from trainer.register import RegisterConfig
from trainer.sample import SampleConfig

URI = "sqlite:////tmp/shared.db"


@pytest.mark.parametrize("schema", [SampleConfig, EvaluateConfig, PromoteConfig, RegisterConfig])
def test_every_command_takes_tracking_uri_as_training_does(schema):
    assert compose([f"tracking.uri={URI}"]).tracking.uri == URI
    assert parse_overrides(schema, [f"tracking.uri={URI}"]).tracking.uri == URI


def test_shared_data_and_eval_keys():
    cfg = compose(["data.urls=shards/x", "eval.features=digits", "eval.num=500"])
    for schema in (EvaluateConfig, PromoteConfig):
        keys = parse_overrides(schema, ["data.urls=shards/x", "eval.features=digits", "eval.num=500"])
        assert (keys.data.urls, keys.eval.features, keys.eval.num) == (
            cfg.data.urls,
            cfg.eval.features,
            cfg.eval.num,
        )


def test_make_shards_takes_trainings_names_for_the_output_and_image_shape():
    keys = ["data.urls=shards/faces", "model.resolution=64", "model.channels=3"]
    cfg = compose(["experiment=images", *keys])
    shards = parse_overrides(MakeShardsConfig, keys, TRAINING_KEYS)
    assert (shards.out, shards.resolution, shards.channels) == (
        cfg.data.urls,
        cfg.model.resolution,
        cfg.model.channels,
    )
    with pytest.raises(ValueError, match="unknown key 'data.url'"):
        parse_overrides(MakeShardsConfig, ["data.url=x"], TRAINING_KEYS)


def test_the_old_key_still_works_with_a_note(capsys):
    assert parse_overrides(SampleConfig, [f"tracking_uri={URI}"]).tracking.uri == URI
    assert "tracking_uri= is now tracking.uri=" in capsys.readouterr().err


def stablegan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "stablegan"), *args], capture_output=True, text=True, timeout=300)


def test_console_script_runs_each_command(tmp_path):
    helped = stablegan("--help")
    assert helped.returncode == 0 and "stablegan make-shards" in helped.stdout
    bad = stablegan("trian")
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr and "train" in bad.stderr
    made = stablegan("make-shards", "source=digits", f"out={tmp_path}/d", "fraction=0.1")
    assert made.returncode == 0 and (tmp_path / "d" / "manifest.json").is_file()
    missing = stablegan("sample", "model=models:/none@champion", f"tracking.uri=sqlite:///{tmp_path}/m.db")
    assert missing.returncode == 2 and "sample: error: cannot resolve models:/none@champion" in missing.stderr
    wrong = stablegan("train", "trainer.max_stepz=5")
    assert wrong.returncode == 2 and "trainer.max_stepz" in wrong.stderr
    assert stablegan("evaluate", "--help").stdout.startswith("Evaluate a registered generator")
