"""Shared fixtures: real shards, a real MLflow server and a real Ray cluster on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Real-data features and the Inception file are cached per test session, not in the user's
# home: set before any Ray or MLflow process starts, so they inherit it.
os.environ["STABLEGAN_CACHE"] = tempfile.mkdtemp(prefix="stablegan-cache-")
# One compiled-extension cache for every process of the session, those given a new user's HOME
# included (`new_user_env`): DeepSpeed compiles its CPU shared-memory op on its first start in a
# HOME, about 40 s of CPU that says nothing about stablegan.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / "tests"))


@pytest.fixture(autouse=True)
def _mlflow_globals_per_test(monkeypatch):
    """MLflow's set_tracking_uri / set_registry_uri (our registry code calls them in-process)
    write module globals and MLFLOW_*_URI into os.environ, where every later test's
    subprocesses would inherit them: a model registered in one test's store would land in an
    earlier test's. Each test starts without them and leaves none behind."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(registry, "_registry_uri", None)
    monkeypatch.setattr(tracking, "_tracking_uri", None)


def pinned(args: list[str], preset: str = "grid25") -> list[str]:
    """`args` plus `experiment=preset` unless they name one (last: Hydra's flags such as `-m`
    come first): tests that check grid25's plumbing (checkpoint steps, logging cadence, the MLP
    pair) do not follow the default preset."""
    return args if any(a.startswith("experiment=") for a in args) else [*args, f"experiment={preset}"]


def new_user_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment as a new user's: HOME (and so ~/.ray, ~/.cache/stablegan) a
    fresh folder, no Ray or MLflow address; the session's compiled-extension cache kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return env | {"HOME": str(home), "PYTHONPATH": str(ROOT), **extra}


def start_module(module: str, args: list[str], env: dict) -> subprocess.Popen:
    """`python -m MODULE ARGS` in the background, in its own process group, output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server and every process it started (mlflow server forks its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over a sqlite store in `root`, in its own process group."""
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
    except TimeoutError:
        stop_group(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; yields its URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


S3_ENV = {  # what a user exports for an S3-compatible server; nothing else carries credentials
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3-compatible server (moto's server mode) on 127.0.0.1, in its own process group;
    yields the environment that points boto3, pyarrow and MLflow at it."""
    pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[dev]')")
    port = free_port()
    root = tmp_path_factory.mktemp("s3")
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/")
        yield {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        stop_group(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test's process (and its children) pointed at the local S3 server, a fresh boto3 client."""
    from data_pipeline import objstore

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    objstore.client.cache_clear()
    yield s3_server
    objstore.client.cache_clear()


def postgres_bindir() -> Path | None:
    """Where Debian's PostgreSQL server binaries are (None when it is not installed)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 with a database `mlflow`; yields its URI.

    initdb refuses to run as root, so as root the server runs as Debian's `postgres` user.
    Skipped when PostgreSQL is not installed, unless STABLEGAN_REQUIRE_POSTGRES=1 (CI sets it).
    """
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("STABLEGAN_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="stablegan-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, check=True, timeout=120, **kw)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "stablegan", "--auth=trust", "-E", "UTF8")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "pg.log"), "-w", "start")
    try:
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "stablegan", "mlflow")
        yield f"postgresql://stablegan@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], timeout=60)
        shutil.rmtree(root, ignore_errors=True)


SECRETS = {  # moto takes any credentials; these values must appear nowhere but the environment
    "AWS_ACCESS_KEY_ID": "AKIAFAKESECRETID7731",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-value-5f2c",
    "MLFLOW_TRACKING_USERNAME": "stablegan-user",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-9d41",
}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server, request):
    """The local stack from launch/local_cluster.sh: a Ray head plus one worker node on loopback
    and an MLflow server, on PostgreSQL when it is installed (else sqlite). Its processes hold
    credentials (`SECRETS`, fake) in their environment, as a cluster launcher or KubeRay would
    give them, and reach the local S3 server (tests/test_secrets.py checks where they leak)."""
    state = tmp_path_factory.mktemp("cluster")
    env = {
        **os.environ,
        **s3_server,
        **SECRETS,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "STABLEGAN_RAY_PORT": str(free_port()),
        "STABLEGAN_DASHBOARD_PORT": str(free_port()),
        "STABLEGAN_MLFLOW_PORT": str(free_port()),
        "STABLEGAN_MLFLOW_DIR": str(state / "mlflow"),
        "STABLEGAN_STATE_DIR": str(state),
        "STABLEGAN_HEAD_CPUS": "2",
        "STABLEGAN_WORKER_CPUS": "1",
        "RAY_AUTH_MODE": "token",
    }
    backend: list[str] = []
    if postgres_bindir() is not None or os.environ.get("STABLEGAN_REQUIRE_POSTGRES") == "1":
        backend = ["--backend-store-uri", request.getfixturevalue("postgres")]
    script = str(ROOT / "launch" / "local_cluster.sh")
    try:  # `down` in any case: a timed-out `up` may have started part of the cluster
        out = subprocess.run([script, "up", *backend], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr + out.stdout
        info = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line and line[0] != "#")
        yield {
            "address": info["RAY_ADDRESS"],
            "dashboard": info["RAY_JOB_ADDRESS"],
            "mlflow": info["MLFLOW_TRACKING_URI"],
            "backend": backend[1] if backend else "sqlite",
            "env": env,
            "script": script,
        }
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ds_dist():
    """A one-process gloo group so DeepSpeed engines can be built inside pytest."""
    import torch.distributed as dist

    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
