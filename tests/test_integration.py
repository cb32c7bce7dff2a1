"""End to end with the real components: a two-node Ray cluster on loopback, DeepSpeed engines,
a real `mlflow server`, and real tar shards. Slow: each run starts Ray Train workers."""

from __future__ import annotations

import contextlib
import json
import math
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
from tests.conftest import ROOT, pinned, start_module
from trainer.train.checkpoint import load_parameters

pytestmark = pytest.mark.slow


def run_main(args: list[str], env: dict, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.main", *pinned(args)],
        env=env,
        cwd=kw.pop("cwd", ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def run_sample(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python -m trainer.sample ARGS` (pull a registered generator and sample it)."""
    return subprocess.run(
        [sys.executable, "-m", "trainer.sample", *args], env=env, capture_output=True, text=True, timeout=300
    )


def start_main(args: list[str], env: dict) -> subprocess.Popen:
    """`python -m trainer.main` in the background, in its own process group, output piped."""
    return start_module("trainer.main", pinned(args), env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until `path` exists (or `proc` ends, or time runs out); whether it exists."""
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return path.exists()


def mode_distances(points: np.ndarray) -> tuple[float, float]:
    """(mean distance sample -> nearest mode, mean distance mode -> nearest sample)."""
    d = np.linalg.norm(points[:, None, :] - grid25_modes()[None], axis=2)
    return float(d.min(1).mean()), float(d.min(0).mean())


@pytest.fixture(scope="module")
def env(ray_cluster):
    return {**ray_cluster["env"], "MLFLOW_TRACKING_URI": ray_cluster["mlflow"], "PYTHONUNBUFFERED": "1"}


def test_two_workers_train_the_default_preset_tracked_registered_and_sampled(env, ray_cluster, tmp_path):
    """The default 2-D preset (`stable`: R1, a G of 50 expert MLPs) through the real stack on two
    workers: two DeepSpeed replicas stay identical, the probe reads G's (k, in, out) weights, the
    run is tracked and registered, and the generator MLflow stores (torch.export) samples the
    same points as its saved EMA weights."""
    from mlflow.tracking import MlflowClient

    name = "it-stable"
    proc = run_main(
        [
            f"cluster.address={ray_cluster['address']}",
            "experiment=stable",
            "trainer.num_workers=2",
            "trainer.max_steps=400",
            "trainer.log_every=100",
            "trainer.sample_every=200",
            "trainer.checkpoint_every=200",
            f"trainer.storage_path={tmp_path}/runs",
            "trainer.run_name=stable-it",
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
    params = run.data.params
    assert params["trainer.num_workers"] == "2" and params["penalty.kind"] == "r1"
    assert params["model.g_experts"] == "50" and params["model.g_expert_prior"] == "learned"
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
    probed = ("sn/D/max", "sn/G/layers.1", "grad/D/total", "grad/G/total", "modes_covered", "high_quality")
    for key in (*probed, "reverse_kl"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [100, 200, 300, 400], key
    assert client.get_metric_history(run_id, "nonfinite")[-1].value == 0
    assert (
        run.data.tags.get("stablegan.diverged") in ("true", "false")
        and "stablegan.first_signal" in run.data.tags
    )
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "penalty"))
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "sn/G/max"))
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
    sample = run_sample([f"model=models:/{name}@champion", "num=2000", f"out={out}", "seed=5"], env)
    assert sample.returncode == 0, sample.stderr
    trained = np.load(out)["samples"]
    assert trained.shape == (2000, 2)

    # Step 0: the same architecture and seed, untrained.
    from trainer.gan.models import build_pair
    from trainer.main import compose

    cfg = compose(["experiment=stable"])
    torch.manual_seed(cfg.trainer.seed)
    G0, _ = build_pair(cfg.model)
    with torch.no_grad():
        initial = G0(torch.randn(2000, cfg.model.latent_dim)).numpy()
    # The untrained G puts everything near (0, 0), which is itself a grid25 mode, so the
    # sample -> mode distance alone starts small; the symmetric (Chamfer) distance also counts
    # the 24 modes nobody samples, and must at least halve.
    (b1, b2), (a1, a2) = mode_distances(initial), mode_distances(trained)
    print(f"sample->mode / mode->sample distance: step 0 {b1:.3f} / {b2:.3f}, step 400 {a1:.3f} / {a2:.3f}")
    assert a1 + a2 <= (b1 + b2) / 2

    # The registered generator (torch.export) samples what the final EMA weights give.
    G, _ = build_pair(cfg.model)
    final = max((tmp_path / "runs" / "stable-it").rglob("ema.pt")).parent  # step 400: the end
    G.load_state_dict({k[4:]: v for k, v in load_parameters(final).items() if k.startswith("ema.")})
    assert G.prior_logits.std() > 0  # G's loss trained the prior (identical on both replicas: drift 0)
    with torch.no_grad():  # trainer.sample's latents: seed 5, as asked above
        mine = G(torch.randn(2000, cfg.model.latent_dim, generator=torch.Generator().manual_seed(5))).numpy()
    assert np.allclose(trained, mine, atol=1e-5)

    png = tmp_path / "grid.png"
    proc = run_sample([f"model=models:/{name}/1", f"out={png}"], env)
    assert proc.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    bad = run_sample([f"model=models:/{name}@production", f"out={png}"], env)
    assert (
        bad.returncode == 2
        and f"versions of '{name}': [1]; aliases: candidate -> 1, champion -> 1" in bad.stderr
    )


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
        [submit, "--address", ray_cluster["dashboard"], "--", *pinned(args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 200/200" in proc.stdout, proc.stdout[-4000:]  # worker logs stream back to the submitter
    assert "registered_model: models:/it-job/1 (also models:/it-job@candidate" in proc.stdout
    run_id = re.search(r"MLflow run (\w+)", proc.stdout).group(1)
    client = MlflowClient(ray_cluster["mlflow"])
    # 200 steps decide little: the stability verdict of so short a run depends on the data
    # order, and the promotion must follow it either way.
    if "stability: diverged" in proc.stdout:
        assert (
            "promotion: left champion unset for it-job v1: the candidate has stability flags" in proc.stdout
        )
    else:
        assert "promotion: made champion: it-job v1: no champion yet; mmd" in proc.stdout
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


def _metric_steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_guard_rolls_every_worker_back_after_a_nan_batch(env, ray_cluster, tmp_path):
    """A poisoned batch at step 160: unguarded, the run ends NaN; guarded, both workers roll back
    to checkpoint 100 together with new latents, keep their lr and penalty (a first NaN is taken
    for a transient fault), and the run ends finite and identical."""
    import json

    from mlflow.tracking import MlflowClient

    common = [
        f"cluster.address={ray_cluster['address']}",
        "experiment=stable",  # the recommended 2-D preset as it ships: no pinned optimizer
        "trainer.num_workers=2",
        "trainer.max_steps=300",
        "trainer.log_every=50",
        "trainer.checkpoint_every=100",
        "trainer.keep_checkpoints=3",
        "trainer.sample_every=0",
        "trainer.inject_nan_at=160",
        "stability.every=50",
        "stability.samples=500",
        "data.loader_workers=1",
        "tracking.register=false",
        f"trainer.storage_path={tmp_path}/runs",
    ]
    client = MlflowClient(ray_cluster["mlflow"])
    runs = {}
    for name, extra in (("unguarded", []), ("guarded", ["stability=guarded"])):
        proc = run_main([*common, *extra, f"trainer.run_name={name}"], env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = client.get_run(re.search(r"MLflow run (\w+)", proc.stdout).group(1))
        runs[name + "_out"] = proc.stdout

    bad = runs["unguarded"]
    assert bad.data.tags["stablegan.diverged"] == "true"
    assert math.isnan(client.get_metric_history(bad.info.run_id, "d_loss")[-1].value)
    assert "stablegan.guard.rollbacks" not in bad.data.tags

    good = runs["guarded"]
    run_id = good.info.run_id
    assert good.data.tags["stablegan.diverged"] == "false", runs["guarded_out"][-3000:]
    guard_lines = "\n".join(line for line in runs["guarded_out"].splitlines() if "guard" in line)
    assert good.data.tags["stablegan.guard.rollbacks"] == "1", guard_lines
    assert good.data.tags["stablegan.guard.triggers"] == "nonfinite", guard_lines
    assert "guard: 1 rollback(s)" in runs["guarded_out"]
    events = json.loads(
        Path(client.download_artifacts(run_id, "guard/events.json", str(tmp_path))).read_text()
    )
    (row,) = events["data"]
    event = dict(zip(events["columns"], row))
    # The first check after the NaN (step 200) trips; 100 is the last healthy checkpoint.
    assert (event["step"], event["trigger"], event["action"], event["rolled_back_to"]) == (
        200,
        "nonfinite",
        "rollback",
        100,
    )
    assert event["lr_scale"] == 1.0 and event["penalty"] == "r1 0.1"  # unchanged: a transient fault
    history = client.get_metric_history(run_id, "d_loss")
    # Step 200 was logged twice: NaN before the rollback, finite on the branch that survived.
    assert [m.step for m in history] == [50, 100, 150, 200, 150, 200, 250, 300]
    assert math.isnan(history[3].value) and all(math.isfinite(m.value) for m in history[4:])
    assert all(m.value == 0.0 for m in client.get_metric_history(run_id, "replica_drift")[4:])
    assert client.get_metric_history(run_id, "nonfinite")[-1].value == 0
    assert (tmp_path / "runs" / "guarded" / "checkpoint_00000300-r1").is_dir()
    ema = torch.load(tmp_path / "runs" / "guarded" / "generator_ema.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ema.values())


def test_the_shipped_image_preset_guarded_in_bf16_on_the_embedded_ray(tmp_path):
    """experiment=stable_images as it ships (guarded), in bf16, on digits, on two workers of the
    embedded Ray and MLflow store a laptop gets, with in-training evaluation (so the quality
    trigger is armed too) and a NaN batch at step 30: exactly one rollback, for the NaN, none for
    anything else; a finite generator, evaluated at the end, registered and made champion;
    credentials in the environment never reach the run's params, tags or config. Watched from
    outside all along: nothing it starts listens beyond loopback, the workers meet at a file
    rendezvous, and the terminal's live bar replaces the step lines."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from tests.test_local_ray import assert_loopback_only, run_watching_listeners

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    secret = "s3cr3t-7f1c9a2e-never-log-me"
    env |= {"AWS_SECRET_ACCESS_KEY": secret, "MLFLOW_TRACKING_PASSWORD": secret, "PYTHONPATH": str(ROOT)}
    args = [
        "experiment=stable_images",
        "parallel=cpu_bf16",
        "trainer.num_workers=2",
        "trainer.max_steps=60",
        "trainer.log_every=10",
        "trainer.progress=bar",  # the live bar a terminal gets (stdout here is a pipe)
        "trainer.checkpoint_every=20",
        "trainer.keep_checkpoints=3",
        "trainer.sample_every=0",
        "trainer.inject_nan_at=30",
        "stability.every=10",
        "eval.every=20",
        "eval.during_num=200",
        "eval.num=300",
        "data.loader_workers=1",
        "tracking.registered_model=it-digits",
        "trainer.run_name=guarded-images",
        f"trainer.storage_path={tmp_path}/runs",
    ]
    code, out, seen = run_watching_listeners([sys.executable, "-m", "trainer.main", *args], env, tmp_path)
    assert code == 0, out[-6000:]
    assert_loopback_only(seen, workers=2)
    assert "file:///" in out and "world_size=2" in out  # the rendezvous is a file, not a TCPStore
    # Rank 0's bar, drawn by the driver: losses, steps done, rate; no periodic step lines.
    # (Ray's renderer counts in floats once the bar has gone back for the rollback: 60.0/60.0.)
    bar = r"stable_images  d_loss [\d.]+  g_loss [\d.]+: 100%.*60(\.0)?/60(\.0)? \[.*(step/s|s/step)\]"
    assert re.search(bar, out), out[-2000:]
    assert "step 10/60" not in out
    assert (tmp_path / "mlflow.db").exists()  # the embedded default store
    # The embedded Ray is one node on 127.0.0.1.
    assert "(ip=127.0.0.1, pid=" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(re.search(r"MLflow run (\w+)", out).group(1))
    guard_lines = "\n".join(line for line in out.splitlines() if "guard" in line)
    assert run.data.tags["stablegan.guard.rollbacks"] == "1", guard_lines
    assert run.data.tags["stablegan.guard.triggers"] == "nonfinite", guard_lines
    assert run.data.tags["stablegan.diverged"] == "false", guard_lines
    assert run.data.params["parallel.precision"] == "bf16"
    assert (run.data.params["model.resolution"], run.data.params["model.channels"]) == ("32", "1")
    # Evaluated during training (EMA G, FD-digits) on the branch that survived, and at the end.
    fids = client.get_metric_history(run.info.run_id, "eval/fid")
    assert [m.step for m in fids][0] == 20 and fids[-1].step == 60 and math.isfinite(fids[-1].value)
    assert re.search(r"evaluation: fid [\d.]+, kid .* \(digits:\w+, 300 samples\)", out)
    ema = torch.load(tmp_path / "runs" / "guarded-images" / "generator_ema.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ema.values())
    with Image.open(re.search(r"sample_image: (\S+)", out).group(1)) as img:
        assert img.mode == "L" and img.size[0] > 32 * 7
    assert "models:/it-digits/1" in out
    assert "promotion: made champion: it-digits v1: no champion yet; fid" in out
    assert client.get_model_version("it-digits", "1").tags["eval.num_fake"] == "300"
    config = client.download_artifacts(run.info.run_id, "config", str(tmp_path / "config"))
    recorded = json.dumps([run.data.params, run.data.tags])
    recorded += "".join(p.read_text() for p in Path(config).rglob("*") if p.is_file())
    assert secret not in recorded


def _worker_pids(lines: list[str]) -> set[int]:
    return {int(p) for line in lines for p in re.findall(r"RayTrainWorker pid=(\d+)", line)}


def test_killed_workers_are_replaced_and_a_guarded_run_resumes(env, ray_cluster, tmp_path):
    """SIGKILL a training worker of a guarded run twice. Once Ray Train holds only the guard's
    step-0 checkpoint: the new worker group resumes from it and must not save it again (Ray
    Train would hold the folder twice and fail when pruning removed it a second time). Then
    mid-run: the next group resumes from the newest checkpoint. MLflow gets every step once."""
    import threading

    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "killed"
    args = [
        f"cluster.address={ray_cluster['address']}",
        "trainer.num_workers=2",
        "trainer.max_steps=600",
        "trainer.log_every=20",
        "trainer.checkpoint_every=200",
        "trainer.keep_checkpoints=2",  # prunes step 0 once 200 and 400 are in
        "trainer.max_failures=2",
        "trainer.sample_every=0",
        "trainer.run_name=killed",
        "stability=guarded",
        f"trainer.storage_path={tmp_path}/runs",
        "data.loader_workers=1",
        "tracking.register=false",
    ]
    proc = start_main(args, {**env, "RAY_DEDUP_LOGS": "0"})  # each rank's lines, none folded
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def registered(name: str) -> bool:  # Ray Train's own record of the checkpoints it holds
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        return snapshot.exists() and name in snapshot.read_text()

    deadline = time.time() + 300
    while not registered("checkpoint_00000000") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    first = _worker_pids(lines)
    assert first and not (run_dir / "checkpoint_00000200").exists(), "".join(lines)[-3000:]
    os.kill(min(first), signal.SIGKILL)
    # The folder of 400 shows that both ranks finished writing 200 (Ray may not have
    # registered it yet: the new workers then take it from disk, by its manifests).
    assert wait_for(run_dir / "checkpoint_00000400", proc), "".join(lines)[-3000:]
    # The second group: the workers that said they resumed (a pid seen earlier may be the first
    # group's other worker, gone with its group).
    resumed = re.findall(r"RayTrainWorker pid=(\d+)[^)]*\)\S*\s+rank \d+ resumed", "".join(lines))
    second = {int(pid) for pid in resumed}
    assert second and not second & first, "".join(lines)[-3000:]
    with contextlib.suppress(ProcessLookupError):  # gone if the run failed: its output says why, below
        os.kill(min(second), signal.SIGKILL)
    try:
        proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    output = "".join(lines)
    assert proc.returncode == 0, output[-4000:]
    resumed_at = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", output)]
    # Step 0 first, then a step of 200 or more (each rank says it; Ray may print a line twice).
    assert resumed_at[0] == 0 and len(set(resumed_at)) == 2 and max(resumed_at) >= 200, resumed_at
    assert not _worker_pids(lines[-50:]) & (first | {min(second)})  # the last lines: a third group
    assert (run_dir / "checkpoint_00000600").is_dir()
    assert not (run_dir / "checkpoint_00000000").exists()  # pruned, once
    run_id = re.search(r"MLflow run (\w+)", output).group(1)
    steps = _metric_steps(MlflowClient(ray_cluster["mlflow"]), run_id, "d_loss")
    assert steps == list(range(20, 601, 20))  # resumed steps are not logged twice


def test_a_killed_run_resumes_bitwise_identical_in_the_same_mlflow_run(env, ray_cluster, tmp_path):
    """1 worker, fp32: the driver SIGKILLed mid-run and the same command resumed to step 200 gives
    exactly the parameters of an uninterrupted 200-step run (same seed): data position, latent
    RNG, optimizer state and the lazy-regularization phase all come back. The step counter and
    the MLflow run continue; every step is logged once (replayed steps are not resent)."""
    from mlflow.tracking import MlflowClient

    common = [
        f"cluster.address={ray_cluster['address']}",
        "penalty=r1_lazy4",  # the lazy schedule's phase must resume too
        "trainer.log_every=10",
        "trainer.checkpoint_every=20",
        "trainer.sample_every=0",
        "trainer.seed=3",
        f"trainer.storage_path={tmp_path}/runs",
        "data.loader_workers=1",
        "tracking.register=false",
    ]
    straight = run_main([*common, "trainer.run_name=straight", "trainer.max_steps=200"], env)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    # grid25's schedules do not depend on max_steps, so a longer first run trains the same steps.
    first = start_main([*common, "trainer.run_name=split", "trainer.max_steps=100000"], env)
    runs = tmp_path / "runs"
    wait_for(runs / "split" / "checkpoint_00000040", first)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-run
    before = first.communicate(timeout=30)[0]
    assert (runs / "split" / "checkpoint_00000040").exists(), before[-3000:]
    # Ray Train's controller registers checkpoints asynchronously: a driver killed this early may
    # leave none registered. Its record removed makes that case certain: the run must resume
    # from the checkpoints on disk all the same, not start over.
    (runs / "split" / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    time.sleep(5)  # let Ray notice the dead job and free its worker

    second = run_main([*common, "trainer.run_name=split", "trainer.max_steps=200"], env)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "(resumed)" in output
    resumed_at = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", output)]
    # A checkpoint's folder appears while it is still being written; its manifests fail then,
    # and the run resumes from the one before (correctly).
    assert resumed_at and 20 <= min(resumed_at) < 200, output[-4000:]
    assert "step 10/200" not in output  # it did not start over
    run_ids = set(re.findall(r"MLflow run (\w+)", before + output))
    assert len(run_ids) == 1, run_ids  # the same MLflow run continues
    steps = _metric_steps(MlflowClient(env["MLFLOW_TRACKING_URI"]), run_ids.pop(), "d_loss")
    assert steps == list(range(10, 201, 10))

    straight, split = (
        load_parameters(runs / "straight" / "checkpoint_00000200"),
        load_parameters(runs / "split" / "checkpoint_00000200"),
    )
    assert straight.keys() == split.keys() and len(straight) > 6
    assert [k for k in straight if not torch.equal(straight[k], split[k])] == []
    # Ray keeps the last trainer.keep_checkpoints (2) of a run.
    assert [c.name for c in sorted((runs / "straight").glob("checkpoint_*")) if c.is_dir()] == [
        "checkpoint_00000180",
        "checkpoint_00000200",
    ]
    # The comparison can fail: 20 steps earlier every tensor differs.
    earlier = load_parameters(runs / "straight" / "checkpoint_00000180")
    assert all(not torch.equal(straight[k], earlier[k]) for k in straight if k.endswith("weight"))


def test_mlflow_outage_mid_run_and_at_the_end(env, ray_cluster, tmp_path):
    """The tracking server stops mid-run for 200 steps: training goes on and every step arrives
    once it is back. Gone for good at the end: the weights stay on disk, the command exits 3 and
    prints how to register them, and that command works once the server is back."""

    from tests.conftest import free_port, start_mlflow_server, stop_group

    port, store = free_port(), tmp_path / "mlflow"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = {**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    runs = tmp_path / "runs"
    common = [
        f"cluster.address={ray_cluster['address']}",
        "trainer.log_every=20",
        "trainer.checkpoint_every=100",
        "trainer.sample_every=0",
        f"trainer.storage_path={runs}",
        "data.loader_workers=1",
    ]
    servers: list[subprocess.Popen] = []  # every server started, stopped at the end whatever happens

    def serve() -> subprocess.Popen:
        servers.append(start_mlflow_server(store, port))  # same port, same store each time
        return servers[-1]

    try:
        _outage_scenarios(serve, common, env, runs, uri)
    finally:
        for server in servers:
            stop_group(server)


def _outage_scenarios(serve, common: list[str], env: dict, runs: Path, uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from tests.conftest import stop_group

    server = serve()
    proc = start_main(
        [*common, "trainer.max_steps=1200", "trainer.run_name=blink", "tracking.register=false"], env
    )
    try:
        assert wait_for(runs / "blink" / "checkpoint_00000200", proc)
        stop_group(server)
        # Away for 200 steps (10 log calls): training goes on without it.
        went_on = wait_for(runs / "blink" / "checkpoint_00000400", proc)
        server = serve()
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    assert went_on and "MLflow unreachable" in output, output[-4000:]  # sends failed meanwhile
    run_id = re.search(r"MLflow run (\w+)", output).group(1)
    client = MlflowClient(uri)
    assert _metric_steps(client, run_id, "d_loss") == list(range(20, 1201, 20))
    assert client.get_run(run_id).info.status == "FINISHED"

    proc = start_main(
        [
            *common,
            "trainer.max_steps=200",
            "trainer.run_name=gone",
            "tracking.registered_model=it-outage",
            "tracking.flush_timeout=5",
        ],
        env,
    )
    try:
        assert wait_for(runs / "gone" / "checkpoint_00000100", proc)
        stop_group(server)
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, output[-4000:]
    later = re.search(
        r"Register the saved weights later with: (python -m trainer.register weights=(\S+) run_id=(\w+))",
        output,
    )
    assert later and Path(later.group(2)).is_file(), output[-4000:]
    serve()
    register = subprocess.run(
        [sys.executable, "-m", "trainer.register", f"weights={later.group(2)}", f"run_id={later.group(3)}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert register.returncode == 0, register.stderr[-3000:]
    assert "models:/it-outage/1" in register.stdout
