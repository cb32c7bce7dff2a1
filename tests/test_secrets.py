"""Secrets stay secret: never on a command line, in a job's stored runtime environment, in the
logs or in a run's parameters; the cluster's nodes take credentials from their own environment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

import pytest

from tests.conftest import ROOT, SECRETS, free_port, pinned
from trainer.services import tracking


def test_redact_hides_the_user_password_part_of_uris(tmp_path):
    assert tracking.redact("postgresql://u:pw@127.0.0.1:5432/db") == "postgresql://***@127.0.0.1:5432/db"
    assert (
        tracking.redact("see http://a:b@h:1/x and s3://bucket/k") == "see http://***@h:1/x and s3://bucket/k"
    )
    assert tracking.redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    uri = f"sqlite:///{tmp_path}/m.db"
    config = {"tracking": {"uri": "http://bob:hunter2@127.0.0.1:5000"}, "trainer": {"max_steps": 3}}
    run_id, _ = tracking.start_run(uri, "redact", "redact-run", config)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["tracking.uri"] == "http://***@127.0.0.1:5000"
    assert run.data.params["trainer.max_steps"] == "3"
    logged = MlflowClient(uri).download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))
    assert "hunter2" not in open(logged).read()


def test_submit_forwards_settings_and_names_what_it_drops(tmp_path):
    """The runtime environment submit.sh builds, read from a stand-in `ray` on PATH that
    records its arguments instead of submitting."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ray").write_text(
        '#!/bin/sh\n[ "$1" = get-auth-token ] && exit 0\nprintf "%s\\n" "$@" > "$RAY_ARGS"\n'
    )
    (fake / "ray").chmod(0o755)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "RAY_ARGS": str(tmp_path / "args"),
        **SECRETS,
        "MLFLOW_TRACKING_URI": "http://bob:hunter2@127.0.0.1:1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    proc = subprocess.run(
        [str(ROOT / "launch" / "submit.sh"), "--address", f"http://127.0.0.1:{free_port()}", "--", "x=1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # No job server answers at that address: the script stops before `ray job submit` ...
    assert proc.returncode != 0 and "no Ray job server answers" in proc.stderr
    # ... so serve one: any HTTP answer will do.
    import http.server

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        proc = subprocess.run(
            [str(ROOT / "launch" / "submit.sh"), "--address", address, "--", "x=1"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().splitlines()
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])["env_vars"]
    assert runtime_env == {
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    for name in (*SECRETS, "the user:password part of MLFLOW_TRACKING_URI"):
        assert name in proc.stderr
    assert not any(v in " ".join(args) for v in (*SECRETS.values(), "hunter2"))


def process_lines_with(values: tuple[str, ...]) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if any(v in line for v in values)]


@pytest.mark.slow
def test_a_job_with_secrets_in_the_environment_leaks_them_nowhere(ray_cluster, tmp_path):
    """A job submitted to the local cluster (whose nodes and submitter hold the credentials in
    their environment) trains with its checkpoints in S3 and its run in MLflow."""
    import boto3
    from mlflow.tracking import MlflowClient

    env = {
        **ray_cluster["env"],
        "MLFLOW_TRACKING_URI": ray_cluster["mlflow"],
        "RAY_JOB_ADDRESS": ray_cluster["dashboard"],
    }
    values = tuple(SECRETS.values())
    s3 = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
        aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    s3.create_bucket(Bucket="secret-drill")
    args = pinned(
        [
            "trainer.max_steps=40",
            "trainer.log_every=20",
            "trainer.checkpoint_every=40",
            "trainer.sample_every=0",
            "data.loader_workers=0",
            "stability.every=20",
            "trainer.storage_path=s3://secret-drill/runs",
            "tracking.registered_model=secret-job",
        ]
    )
    proc = subprocess.Popen(
        [str(ROOT / "launch" / "submit.sh"), "--address", env["RAY_JOB_ADDRESS"], "--", *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[str] = []
    while proc.poll() is None:  # the process list, all through the submission and the job
        seen += process_lines_with(values)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert seen == []
    assert "not forwarded to the job" in stderr and "AWS_SECRET_ACCESS_KEY" in stderr
    assert not any(v in stdout + stderr for v in values)
    # What Ray stores and shows of the job: its runtime environment among the rest.
    listed = subprocess.run(
        ["ray", "job", "list", "--address", env["RAY_JOB_ADDRESS"]], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0 and "secret-drill" in listed.stdout, listed.stderr[-2000:]
    assert not any(v in listed.stdout for v in values)
    assert "AWS_ENDPOINT_URL" in listed.stdout  # the settings did travel
    # The job reached MLflow (params and tags clean) and the S3 server (checkpoints there).
    run_id = re.search(r"MLflow run (\w+)", stdout).group(1)
    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.info.status == "FINISHED"
    recorded = json.dumps([run.data.params, run.data.tags])
    assert not any(v in recorded for v in values)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="secret-drill", Prefix="runs/").get("Contents", [])]
    assert any("/checkpoint_" in k for k in keys) and any(k.endswith("generator_ema.pt") for k in keys)
