"""End to end with the real components: a two-node Ray cluster on loopback, DeepSpeed engines,
a real `mlflow server`, and real tar shards. Slow: each run starts Ray Train workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.sources import grid25_modes
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_main(args: list[str], env: dict, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.main", *args],
        env=env,
        cwd=kw.pop("cwd", ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def mode_distances(points: np.ndarray) -> tuple[float, float]:
    """(mean distance sample -> nearest mode, mean distance mode -> nearest sample)."""
    d = np.linalg.norm(points[:, None, :] - grid25_modes()[None], axis=2)
    return float(d.min(1).mean()), float(d.min(0).mean())


@pytest.fixture(scope="module")
def env(ray_cluster):
    return {**ray_cluster["env"], "MLFLOW_TRACKING_URI": ray_cluster["mlflow"], "PYTHONUNBUFFERED": "1"}


def test_two_workers_grid25_r1_tracked_registered_and_sampled(env, ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    name = "it-grid25"
    proc = run_main(
        [
            f"cluster.address={ray_cluster['address']}",
            "trainer.num_workers=2",
            "trainer.max_steps=400",
            "trainer.log_every=100",
            "trainer.sample_every=200",
            "trainer.checkpoint_every=200",
            f"trainer.storage_path={tmp_path}/runs",
            "trainer.run_name=grid-it",
            "data.loader_workers=1",
            f"tracking.registered_model={name}",
        ],
        env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = re.search(r"MLflow run (\w+)", proc.stdout).group(1)

    client = MlflowClient(ray_cluster["mlflow"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.num_workers"] == "2" and run.data.params["penalty.kind"] == "r1"
    for key in (
        "d_loss",
        "g_loss",
        "penalty",
        "d_real",
        "d_fake",
        "d_grad_norm",
        "g_grad_norm",
        "images_per_sec",
        "data_skipped",
        "replica_drift",
    ):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [100, 200, 300, 400], key
    # Data parallelism kept G and D bitwise identical on both ranks, at every logged step.
    assert all(m.value == 0.0 for m in client.get_metric_history(run_id, "replica_drift"))
    # The stability probe ran every 100 steps and the summary became tags and a report.
    for key in ("sn/D/max", "grad/D/total", "grad/G/total", "modes_covered", "high_quality", "reverse_kl"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [100, 200, 300, 400], key
    assert client.get_metric_history(run_id, "nonfinite")[-1].value == 0
    assert (
        run.data.tags.get("stablegan.diverged") in ("true", "false")
        and "stablegan.first_signal" in run.data.tags
    )
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "penalty"))
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "samples")
    }
    assert {
        "config",
        "samples/step_0000200.png",
        "samples/step_0000400.png",
        "samples/final.png",
        "stability.json",
        "stability.png",
    } <= artifacts, proc.stdout[-3000:]

    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1 and versions[0].run_id == run_id
    assert versions[0].tags["steps"] == "400" and versions[0].tags["run_id"] == run_id

    out = tmp_path / "s.npz"
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.sample",
            f"model=models:/{name}@champion",
            "num=2000",
            f"out={out}",
            "seed=5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr
    trained = np.load(out)["samples"]
    assert trained.shape == (2000, 2)

    # Step 0: the same architecture and seed, untrained.
    from trainer.main import compose
    from trainer.models import build_pair

    cfg = compose([])
    torch.manual_seed(cfg.trainer.seed)
    G0, _ = build_pair(
        "mlp",
        cfg.model.latent_dim,
        g_width=cfg.model.g_width,
        d_width=cfg.model.d_width,
        depth=cfg.model.depth,
    )
    with torch.no_grad():
        initial = G0(torch.randn(2000, cfg.model.latent_dim)).numpy()
    # The untrained G puts everything near (0, 0), which is itself a grid25 mode, so the
    # sample -> mode distance alone starts small; the symmetric (Chamfer) distance also counts
    # the 24 modes nobody samples, and must at least halve.
    (b1, b2), (a1, a2) = mode_distances(initial), mode_distances(trained)
    print(f"sample->mode / mode->sample distance: step 0 {b1:.3f} / {b2:.3f}, step 400 {a1:.3f} / {a2:.3f}")
    assert a1 + a2 <= (b1 + b2) / 2

    png = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.sample", f"model=models:/{name}/1", f"out={png}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(
        [sys.executable, "-m", "trainer.sample", f"model=models:/{name}@production", f"out={png}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and f"versions of '{name}': [1]; aliases: champion -> 1" in bad.stderr


def test_ray_job_submit_two_nodes_exactly_once_per_epoch(env, ray_cluster, tmp_path):
    """The multi-node path: `ray job submit` to a head + worker node, one training worker per
    node (custom resources), the shards split between them exactly once per epoch."""
    import gzip
    import json

    from mlflow.tracking import MlflowClient

    submit = str(ROOT / "launch" / "submit.sh")
    args = [
        "trainer.num_workers=2",
        "trainer.worker_resources={stablegan_slot:1}",  # one per node: each node has one slot
        "trainer.max_steps=200",  # an epoch is 50,000 points per rank = 196 batches of 256
        "trainer.log_every=100",
        "trainer.checkpoint_every=200",
        "trainer.sample_every=0",
        f"trainer.storage_path={tmp_path}/runs",
        "data.loader_workers=1",
        "data.audit=true",
        # Spectral norm keeps power-iteration vectors in buffers: the stability probe on rank 0
        # must put them back, or the two ranks drift apart (replica_drift below).
        "model.spectral_norm=d",
        "stability.every=100",
        "tracking.registered_model=it-job",
    ]
    proc = subprocess.run(
        [submit, "--address", ray_cluster["dashboard"], "--", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 200/200" in proc.stdout, proc.stdout[-4000:]  # worker logs stream back to the submitter
    assert "registered_model: models:/it-job/1 (also models:/it-job@champion" in proc.stdout
    run_id = re.search(r"MLflow run (\w+)", proc.stdout).group(1)

    client = MlflowClient(ray_cluster["mlflow"])
    assert client.get_model_version_by_alias("it-job", "champion").run_id == run_id
    assert [m.value for m in client.get_metric_history(run_id, "replica_drift")] == [0.0, 0.0]
    assert [m.step for m in client.get_metric_history(run_id, "sn/D/max")] == [100, 200]
    assert max(m.value for m in client.get_metric_history(run_id, "sn/D/max")) < 1.1
    path = client.download_artifacts(run_id, "data_audit.json.gz", str(tmp_path))
    ranks = json.loads(gzip.decompress(open(path, "rb").read()))["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["node_ip"] for r in ranks} == {"127.0.0.2", "127.0.0.3"}  # head and worker node
    epoch0 = [r["epochs"]["0"] for r in ranks]
    assert all(len(keys) == len(set(keys)) for keys in epoch0)  # no sample twice on a rank
    assert not set(epoch0[0]) & set(epoch0[1])  # no sample on both ranks
    assert len(epoch0[0]) + len(epoch0[1]) == 100_000  # and every sample of the dataset
    manifest = json.loads((tmp_path / "runs" / "datasets" / "grid25" / "manifest.json").read_text())
    assert manifest["num_samples"] == 100_000

    failing = subprocess.run(
        [submit, "--address", ray_cluster["dashboard"], "--", "trainer.num_workers=0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failing.returncode != 0
    assert "trainer.num_workers=0 is invalid" in failing.stdout + failing.stderr


def test_stopped_run_resumes_and_continues_the_step_counter(env, ray_cluster, tmp_path):
    args = [
        f"cluster.address={ray_cluster['address']}",
        "trainer.num_workers=2",
        "trainer.log_every=20",
        "trainer.checkpoint_every=40",
        f"trainer.storage_path={tmp_path}/runs",
        "trainer.run_name=resume-it",
        "data.loader_workers=1",
        "tracking.register=false",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "trainer.main", *args, "trainer.max_steps=100000"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ckpt = tmp_path / "runs" / "resume-it" / "checkpoint_00000080"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-run
    first.wait(30)
    assert ckpt.exists(), first.stdout.read()[-3000:]
    time.sleep(5)  # let Ray notice the dead job and free its workers

    second = run_main([*args, "trainer.max_steps=160"], env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "(resumed)" in output
    resumed_at = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", output)]
    # The folder of checkpoint 80 appears while it is still being written; Ray registers it
    # only when every rank has reported, so a kill just then resumes from 40 (correctly).
    assert resumed_at and min(resumed_at) >= 40
    assert "step 20/160" not in output  # it did not start over
    assert (tmp_path / "runs" / "resume-it" / "checkpoint_00000160").exists()


def test_dcgan32_bf16_smoke_on_digits_with_embedded_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    secret = "s3cr3t-7f1c9a2e-never-log-me"
    env |= {"AWS_SECRET_ACCESS_KEY": secret, "MLFLOW_TRACKING_PASSWORD": secret}
    proc = run_main(
        [
            "experiment=digits32",
            "parallel=cpu_bf16",
            "trainer.max_steps=6",
            "trainer.log_every=3",
            "trainer.checkpoint_every=6",
            "data.batch_size=16",
            "data.loader_workers=1",
            f"trainer.storage_path={tmp_path}/runs",
            "tracking.registered_model=it-digits",
        ],
        env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "mlflow.db").exists()  # the embedded default store
    # The embedded Ray stays on loopback (Ray would turn 127.0.0.1 into the host's address).
    assert "(ip=127.0.0.100, pid=" in proc.stdout + proc.stderr
    image = re.search(r"sample_image: (\S+)", proc.stdout).group(1)
    from PIL import Image

    with Image.open(image) as img:
        assert img.mode == "L" and img.size[0] > 32 * 7
    assert "models:/it-digits/1" in proc.stdout
    # Credentials from the environment never reach the run's params, tags or config artifact.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        recorded = json.dumps([run.data.params, run.data.tags])
        config = client.download_artifacts(run.info.run_id, "config", str(tmp_path / run.info.run_id))
        recorded += "".join(p.read_text() for p in Path(config).rglob("*") if p.is_file())
        assert secret not in recorded
