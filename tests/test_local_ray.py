"""The embedded default on a laptop: nothing it starts listens beyond loopback (Ray's GCS,
raylet, core workers, agents and dashboard, and the workers' torch.distributed rendezvous:
trainer/services/local_ray.py), and its live progress bar. Slow: a real two-worker run."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, stop_group

pytestmark = pytest.mark.slow


def listeners(root: psutil.Process) -> set[tuple[str, int, str, int]]:
    """(address, port, process name, pid) of every TCP socket that `root` or a descendant listens on."""
    found = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            name, parent = p.name(), p.parent()
            # A DataLoader worker inherits its Ray worker's sockets, and its name until torch
            # renames it (pt_data_worker): a child named like its parent is a fork, not a worker.
            if parent is not None and parent.name() == name and name.startswith("ray::"):
                name = f"fork of {name}"
            found |= {
                (c.laddr.ip, c.laddr.port, name, p.pid)
                for c in p.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
            }
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def test_is_loopback_knows_the_wildcards():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1")))


def test_embedded_default_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # trainer.progress=bar: the live bar a terminal gets (stdout here is a pipe, so auto would print lines)
    args = [
        "experiment=grid25",
        "trainer.num_workers=2",
        "trainer.max_steps=200",
        "trainer.log_every=50",
        "trainer.progress=bar",
    ]
    args += ["tracking.register=false", "eval.at_end=false", f"trainer.storage_path={tmp_path}/runs"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.main", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: set[tuple[str, int, str, int]] = set()
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:  # sample the whole run: start, training, shutdown
            try:
                seen |= listeners(root)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.3)
        out = proc.communicate(timeout=60)[0]
    finally:
        stop_group(proc)
    assert proc.returncode == 0, out[-3000:]
    names = {s[2] for s in seen}
    # Sampled while it trained: the GCS, the raylet and both Ray Train workers were listening.
    assert {"gcs_server", "raylet"} <= names, sorted(names)
    assert len({s[3] for s in seen if s[2].startswith("ray::RayTrainW")}) == 2, seen
    wide = sorted(s for s in seen if not is_loopback(s[0]))
    assert not wide, f"listening beyond loopback: {wide}"
    assert "file:///" in out and "world_size=2" in out  # the rendezvous is a file, not a TCPStore
    # Rank 0's bar, drawn by the driver: losses, steps done, rate; no periodic step lines.
    assert re.search(r"grid25  d_loss [\d.]+  g_loss [\d.]+: 100%.*200/200 \[.*step/s\]", out), out[-2000:]
    assert "step 50/200" not in out
