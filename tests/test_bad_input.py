"""Bad input at the command line: each case exits 2 with one line that names the problem and
the fix, before any training starts (and without a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, pinned


def main(args: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [sys.executable, "-m", "trainer.main", *pinned(args), f"trainer.storage_path={cwd}/runs"],
        env={**env, "PYTHONPATH": str(ROOT), **extra_env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def expect_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]


def test_missing_shards(tmp_path):
    proc = main([f"data.urls={tmp_path}/faces-{{000000..000003}}.tar"], tmp_path)
    expect_user_error(proc, "data.urls:", "4 shard(s) not found")


def test_too_few_shards_for_the_readers(tmp_path):
    """Each rank x loader worker reads shards of its own: fewer loader workers when the shards
    allow it (said), a clear error before Ray starts when even one per rank does not fit."""
    from data_pipeline.make_shards import MakeShardsConfig, write_shards
    from trainer.config import Config
    from trainer.services.plan import UserError, fit_readers

    write_shards(MakeShardsConfig(source="digits", out=str(tmp_path / "d"), shard_size=900), progress=False)
    proc = main(["experiment=digits32", "trainer.num_workers=3", f"data.urls={tmp_path / 'd'}"], tmp_path)
    expect_user_error(proc, "2 shard(s) cannot be split over trainer.num_workers=3", "shard_size=")
    cfg = Config()
    cfg.trainer.num_workers, cfg.data.loader_workers = 2, 4
    cfg = fit_readers(cfg, 5)
    assert cfg.data.loader_workers == 2
    cfg.data.resample, cfg.data.loader_workers = True, 4
    cfg = fit_readers(cfg, 1)
    assert cfg.data.loader_workers == 4
    with pytest.raises(UserError, match="data.resample=true"):
        fit_readers(Config(trainer=replace(Config().trainer, num_workers=2)), 1)


def test_channels_differ_from_the_model(tmp_path):
    from data_pipeline.make_shards import MakeShardsConfig, write_shards

    write_shards(
        MakeShardsConfig(source="digits", out=str(tmp_path / "d"), resolution=32, channels=1), progress=False
    )
    proc = main(["experiment=digits32", "model.channels=3", f"data.urls={tmp_path / 'd'}"], tmp_path)
    expect_user_error(
        proc, "the shards hold (1, 32, 32) images but the model expects (3, 32, 32)", "model.channels=1"
    )


def test_checkpoint_from_an_incompatible_config(tmp_path):
    from dataclasses import asdict

    from trainer.main import compose

    saved = asdict(compose(["experiment=grid25"]))
    saved["model"]["g_width"] = 64
    folder = tmp_path / "runs" / "old" / "checkpoint_00000100"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(saved))
    proc = main(["trainer.run_name=old"], tmp_path)
    expect_user_error(proc, "trainer.run_name=old:", "model.g_width=64 (now 256)", "another trainer.run_name")


def test_unreachable_ray_cluster(tmp_path):
    proc = main([f"cluster.address=127.0.0.1:{free_port()}"], tmp_path)
    expect_user_error(proc, "cannot reach the Ray cluster at '127.0.0.1:", "launch/local_cluster.sh up")
    assert not (tmp_path / "mlflow.db").exists()  # failed before any MLflow run was opened


def test_auto_address_of_a_cluster_that_is_gone(tmp_path):
    # cluster=existing (address "auto") after the cluster stopped: Ray's record of the last
    # `ray start` still names it, and ray.init would wait minutes for it. (Ray rewrites a
    # recorded 127.0.0.1 to the host's outward address; 127.0.0.5 stays on loopback.)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.5:{free_port()}")
    proc = main(["cluster=existing"], tmp_path, RAY_TMPDIR=str(tmp_path))
    expect_user_error(proc, "cannot reach the Ray cluster at 'auto': nothing answers at 127.0.0.5:")


@pytest.mark.slow
def test_unreachable_mlflow_server(tmp_path):
    proc = main([f"tracking.uri=http://127.0.0.1:{free_port()}"], tmp_path)
    expect_user_error(proc, "cannot open the MLflow run at http://127.0.0.1:", "no MLflow server answers")


def test_parallel_sweep_without_a_shared_cluster(tmp_path):
    # Each joblib job would start a Ray of its own; the check runs before Hydra launches any.
    proc = main(["-m", "hydra/launcher=joblib", "trainer.seed=0,1"], tmp_path)
    expect_user_error(
        proc, "hydra/launcher=joblib runs the sweep's jobs in parallel", "launch/local_cluster.sh up"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()


def test_parallel_sweep_over_cluster_addresses(tmp_path):
    # Every job names a cluster: the check passes, and the jobs stop at the unreachable
    # clusters. With an empty value among them, one job would start a Ray of its own: refused.
    a, b = f"127.0.0.5:{free_port()}", f"127.0.0.5:{free_port()}"
    proc = main(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"cluster.address={a},{b}"], tmp_path
    )
    assert "runs the sweep's jobs in parallel" not in proc.stderr
    expect_user_error(proc, "cannot reach the Ray cluster at '127.0.0.5:")
    proc = main(["-m", "hydra/launcher=joblib", f"cluster.address='',{a}"], tmp_path)
    expect_user_error(proc, "runs the sweep's jobs in parallel", "every value, in a sweep over it")


def test_parallel_sweep_takes_the_address_from_a_config_group(tmp_path):
    # cluster=existing sets cluster.address in YAML: the launcher check passes, and the jobs
    # then stop at the unreachable cluster (nothing listens at the recorded address).
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.5:{free_port()}")
    proc = main(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "cluster=existing", "trainer.seed=0,1"],
        tmp_path,
        RAY_TMPDIR=str(tmp_path),
    )
    assert "runs the sweep's jobs in parallel" not in proc.stderr
    expect_user_error(proc, "cannot reach the Ray cluster at 'auto'")
