"""Object storage against a local S3-compatible server (moto, on 127.0.0.1): shards streamed
from s3:// without a local copy, checkpoints kept in S3 and resumed from, MLflow artifacts in S3."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline import objstore
from data_pipeline.make_shards import MakeShardsConfig, write_shards
from data_pipeline.shards import ShardSpecError, resolve
from data_pipeline.stream import ShardLoader, StreamConfig
from tests.test_stream import _pixels_key


def bucket() -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    objstore.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards(
        MakeShardsConfig(source="digits", out=str(out), resolution=8, shard_size=100), progress=False
    )
    return out


def test_shards_stream_from_s3_exactly_once_like_local_ones(s3_env, digits, tmp_path):
    b = bucket()
    objstore.upload_folder(digits, f"s3://{b}/digits")
    shards = resolve(f"s3://{b}/digits/")  # a prefix with a manifest: its order and shape
    assert len(shards.urls) == 18 and shards.urls[0].startswith(f"s3://{b}/digits/")
    assert shards.sample_shape == (1, 8, 8)

    def epoch(urls, workers: int) -> Counter:
        cfg = StreamConfig(urls=urls, batch_size=50, num_workers=workers, infinite=False, drop_last=False)
        return Counter(k for batch in ShardLoader(cfg) for k in _pixels_key(batch["x"]))

    remote = epoch(f"s3://{b}/digits/", 2)  # read by two loader worker processes
    assert remote == epoch(str(digits), 0) and sum(remote.values()) == 1797
    pattern = f"s3://{b}/digits/digits-{{000000..000017}}.tar"
    assert sum(epoch(pattern, 0).values()) == 1797  # a brace pattern needs no listing
    with pytest.raises(ShardSpecError, match="holds no .tar shards"):
        resolve(f"s3://{b}/nothing/")


def test_a_missing_s3_shard_is_skipped_and_counted(s3_env, digits):
    b = bucket()
    objstore.upload_folder(digits, f"s3://{b}/d")
    urls = [f"s3://{b}/d/digits-000000.tar", f"s3://{b}/d/missing.tar"]
    cfg = StreamConfig(urls=urls, batch_size=10, num_workers=0, infinite=False, expected_shape=(1, 8, 8))
    loader = ShardLoader(cfg)
    with pytest.warns(UserWarning, match="missing.tar"):
        assert sum(len(batch["x"]) for batch in loader) == 100
    assert loader.skipped["unreadable_shard"] == 1


@pytest.mark.slow
def test_a_run_on_s3_shards_keeps_checkpoints_and_artifacts_in_s3_and_resumes(s3_env, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    b = bucket()
    write_shards(
        MakeShardsConfig(source="grid25", out=str(tmp_path / "g"), num_samples=20_000, shard_size=2_000),
        progress=False,
    )
    objstore.upload_folder(tmp_path / "g", f"s3://{b}/grid25")
    shutil.rmtree(tmp_path / "g")  # the run reads the bucket only
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {**s3_env, "STABLEGAN_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    args = [
        "experiment=grid25",
        f"data.urls=s3://{b}/grid25/",
        f"trainer.storage_path=s3://{b}/runs",
        "trainer.run_name=s3run",
        "trainer.num_workers=1",
        "trainer.checkpoint_every=20",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location=s3://{b}/mlflow",
        "tracking.registered_model=s3gen",
    ]

    def train(steps: int) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.main", *args, f"trainer.max_steps={steps}"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = train(40)
    assert f"checkpoint: s3://{b}/runs/s3run/checkpoint_00000040" in first
    runs = objstore.list_keys(f"s3://{b}/runs/s3run/")
    assert any(u.endswith("checkpoint_00000040/ema.pt") for u in runs)
    assert f"s3://{b}/runs/s3run/generator_ema.pt" in runs
    artifacts = objstore.list_keys(f"s3://{b}/mlflow/")
    assert any(u.endswith("/samples/final.png") for u in artifacts)  # MLflow wrote to the bucket

    shutil.rmtree(cache / "storage")  # another machine: nothing local, the bucket only
    second = train(60)
    assert "(resumed)" in second and "finished 60 steps" in second
    assert "rank 0 resumed from checkpoint at step 40" in second  # from the bucket's checkpoint
    assert any(u.endswith("checkpoint_00000060/ema.pt") for u in objstore.list_keys(f"s3://{b}/runs/s3run/"))

    # Ray Train's record of the checkpoints gone (a driver killed before its controller
    # registered any): the run resumes from the newest checkpoint in the bucket all the same.
    snapshot = "runs/s3run/checkpoint_manager_snapshot.json"
    assert f"s3://{b}/{snapshot}" in objstore.list_keys(f"s3://{b}/runs/s3run/")
    objstore.client().delete_object(Bucket=b, Key=snapshot)
    third = train(80)
    assert "rank 0 resumed from checkpoint at step 60" in third and "finished 80 steps" in third

    sampled = subprocess.run(
        [sys.executable, "-m", "trainer.sample", "model=models:/s3gen/2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
         "num=16", f"out={tmp_path}/s.png"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert sampled.returncode == 0 and (tmp_path / "s.png").is_file(), sampled.stderr[-2000:]
