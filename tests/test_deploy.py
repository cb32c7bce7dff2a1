"""launch/ and docker/: scripts, the cluster-launcher config, the RayJob and the compose stack.

No Docker engine or Kubernetes runs here, so the files are parsed and checked against each
other and against what the project really accepts (Ray's cluster schema, our config schema,
`mlflow server`'s flags); the scripts are linted and run for their error paths.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
from importlib.metadata import version

import pytest
import yaml

from tests.conftest import BIN, ROOT, free_port
from trainer.main import compose

SCRIPTS = [
    ROOT / "launch" / "local_cluster.sh",
    ROOT / "launch" / "submit.sh",
    ROOT / "docker" / "install.sh",
]
PROJECT_VERSION = version("stablegan")
IMAGE = f"stablegan:{PROJECT_VERSION}"


def pins() -> dict[str, str]:
    lines = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def script_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **extra}


def custom_resources(text: str) -> set[str]:
    """Resource names in `--resources` JSON snippets (escaped or not) of a script or manifest."""
    return set(re.findall(r'\\?"(node_\w+|stablegan_slot)\\?"', text))


# --- scripts -------------------------------------------------------------------------------


def test_shell_scripts_pass_shellcheck_and_use_strict_mode():
    out = subprocess.run(
        [str(BIN / "shellcheck"), *map(str, SCRIPTS), str(ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout
    for script in SCRIPTS:
        assert "set -euo pipefail" in script.read_text(), script


@pytest.mark.parametrize("script", SCRIPTS[:2], ids=lambda p: p.name)
def test_scripts_have_help_and_reject_unknown_arguments(script):
    helped = subprocess.run([str(script), "--help"], env=script_env(), capture_output=True, text=True)
    assert helped.returncode == 0 and "launch/" in helped.stdout
    bad = subprocess.run([str(script), "--bogus"], env=script_env(), capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown" in bad.stderr and "'--bogus'" in bad.stderr


def test_install_chooses_the_torch_build_for_the_machine(tmp_path):
    """GPU: PyPI's (CUDA) wheel. No GPU: PyTorch's CPU index where it answers (a local HTTP
    server stands in for it), else PyPI's wheel after a one-line warning about its size."""
    import functools
    import http.server
    import threading

    def choice(index: str, gpu: bool) -> subprocess.CompletedProcess:
        path = f"{tmp_path / 'gpu'}:{os.environ['PATH']}" if gpu else os.environ["PATH"]
        env = {**os.environ, "PATH": path, "STABLEGAN_PRINT_TORCH": "1", "STABLEGAN_TORCH_CPU_INDEX": index}
        return subprocess.run(["bash", str(SCRIPTS[2])], env=env, capture_output=True, text=True, timeout=60)

    (tmp_path / "gpu").mkdir()
    fake = tmp_path / "gpu" / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    (tmp_path / "index" / "cpu" / "torch").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live = f"http://127.0.0.1:{server.server_address[1]}/cpu"
        assert choice(live, gpu=False).stdout.split() == ["torch==2.13.0", "--index-url", live]
        gpu = choice(live, gpu=True)
        assert gpu.stdout.split() == ["torch==2.13.0"] and not gpu.stderr
    finally:
        server.shutdown()
    dead = choice(f"http://127.0.0.1:{free_port()}/cpu", gpu=False)
    assert dead.stdout.split() == ["torch==2.13.0"]
    assert "unreachable" in dead.stderr and "several GB" in dead.stderr and len(dead.stderr.splitlines()) == 1


def test_local_cluster_errors_name_the_problem(tmp_path):
    port = str(free_port())
    env = script_env(STABLEGAN_RAY_PORT=port, STABLEGAN_STATE_DIR=str(tmp_path))
    script = str(ROOT / "launch" / "local_cluster.sh")
    status = subprocess.run([script, "status"], env=env, capture_output=True, text=True)
    assert status.returncode != 0 and f"no cluster on 127.0.0.2:{port}" in status.stderr
    down = subprocess.run([script, "down"], env=env, capture_output=True, text=True)
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    with socket.socket() as taken:  # something else holds the port
        taken.bind(("127.0.0.2", int(port)))
        taken.listen()
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert up.returncode != 0 and f"port 127.0.0.2:{port} is taken" in up.stderr
    bad = subprocess.run([script, "up", "--workers", "two"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--workers must be a number" in bad.stderr


def test_submit_errors_name_the_problem(tmp_path):
    script = str(ROOT / "launch" / "submit.sh")
    no_token = subprocess.run(
        [script, "--address", "http://127.0.0.2:1", "--", "trainer.max_steps=1"],
        env={**script_env(HOME=str(tmp_path)), "RAY_AUTH_TOKEN": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_token.returncode != 0 and "no Ray auth token" in no_token.stderr
    port = free_port()
    no_server = subprocess.run(
        [script, "--address", f"http://127.0.0.2:{port}", "--", "trainer.max_steps=1"],
        env=script_env(RAY_AUTH_TOKEN="x" * 32),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_server.returncode != 0
    assert f"no Ray job server answers at http://127.0.0.2:{port}" in no_server.stderr


def test_the_environment_matches_the_pins():
    """CI installs through docker/install.sh, as the image does: the same pinned versions."""
    for name, pinned in pins().items():
        assert version(name) == pinned, name
    install = (ROOT / "docker" / "install.sh").read_text()
    assert "-c docker/constraints.txt" in install and "torch==$TORCH_VERSION" in install


# --- docker/ -------------------------------------------------------------------------------


def test_dockerfile_installs_through_the_tested_script():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(ROOT / "docker" / "Dockerfile"))
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu\d+\.\d+", parser.baseimage)
    copied = [i["value"].split()[:-1] for i in parser.structure if i["instruction"] == "COPY"]
    for sources in copied:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    assert any("bash docker/install.sh" in r for r in runs)
    # Everything install.sh and the package need is copied before it runs.
    flat = {s.rstrip("/") for sources in copied for s in sources}
    assert {"pyproject.toml", "docker", "trainer", "data_pipeline", "configs"} <= flat
    assert parser.envs.get("STABLEGAN_EXTRAS") == "server"  # psycopg + boto3 for the MLflow service
    assert "wget" in " ".join(runs)  # KubeRay's probes use it


def test_compose_stack_is_consistent():
    stack = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = stack["services"]
    assert {"postgres", "minio", "mlflow", "ray-head", "ray-worker"} <= set(services)
    for name in ("mlflow", "ray-head", "ray-worker"):
        svc = services[name]
        assert svc["image"] == IMAGE, name
        build = ROOT / "docker" / svc["build"]["context"]
        assert (build / svc["build"]["dockerfile"]).is_file()
    # Published ports are on loopback only.
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    # Every ${VAR} the file needs is in the env example.
    text = (ROOT / "docker" / "compose.yaml").read_text()
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "docker" / "env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    needed = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    assert needed and needed <= set(example), needed - set(example)
    # MLflow on PostgreSQL with S3 artifacts, with flags the installed mlflow really has.
    cmd = services["mlflow"]["command"]
    assert cmd[:2] == ["mlflow", "server"]
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in cmd)
    assert any(a.startswith("--artifacts-destination=s3://") for a in cmd)
    flags = subprocess.run([str(BIN / "mlflow"), "server", "--help"], capture_output=True, text=True).stdout
    for arg in cmd[2:]:
        assert arg.split("=")[0] in flags, arg
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    # The Ray nodes carry the same custom resources as the local cluster script.
    head, worker = (" ".join(services[n]["command"]) for n in ("ray-head", "ray-worker"))
    local = custom_resources((ROOT / "launch" / "local_cluster.sh").read_text())
    assert {"node_head", "stablegan_slot"} <= custom_resources(head) <= local
    assert "--address=ray-head:6379" in worker and custom_resources(worker) <= local | {"node_worker_1"}


# --- launch/ cluster configs ---------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "launch" / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(raw))
    nodes = raw["available_node_types"]
    assert raw["head_node_type"] in nodes
    worker = nodes["gpu_worker"]
    assert worker["resources"] == {"stablegan_slot": 1} and worker["max_workers"] >= worker["min_workers"]
    setup = "\n".join(raw["setup_commands"])
    assert "docker/install.sh" in setup and "/mnt/shared" in setup and "MLFLOW_TRACKING_URI" in setup
    # Shared storage: the path the gpu_cluster trainer preset writes to is on the mount.
    assert compose(["trainer=gpu_cluster"]).trainer.storage_path.startswith("/mnt/shared/")
    broken = {**raw, "available_node_types": {**nodes, "head": {**nodes["head"], "bogus": 1}}}
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(broken))


def test_rayjob_runs_a_valid_training_command_on_the_image():
    job = yaml.safe_load((ROOT / "launch" / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "trainer.main"]
    cfg = compose([a for a in argv[3:] if not a.startswith("data.urls=")])  # the overrides are valid
    assert cfg.trainer.use_gpu and cfg.trainer.storage_path.startswith("/mnt/shared/")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pins()["ray"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == cfg.trainer.num_workers
    assert custom_resources(workers["rayStartParams"]["resources"]) == set(cfg.trainer.worker_resources)
    pods = [cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"].endswith("/" + IMAGE)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/mnt/shared" in mounts
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]  # from a Secret only
    gpu = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpu) == 1
