"""The embedded default on a laptop: nothing it starts listens beyond loopback (Ray's GCS,
raylet, core workers, agents and dashboard, and the workers' torch.distributed rendezvous:
trainer/services/local_ray.py). The two-worker run that checks it is the shipped image preset's
in tests/test_integration.py (one embedded Ray start serves both); this file holds the watcher."""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from tests.conftest import stop_group


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


def run_watching_listeners(
    cmd: list[str], env: dict, cwd: Path, every: float = 0.5, timeout: float = 900
) -> tuple[int, str, set[tuple[str, int, str, int]]]:
    """Run `cmd` to its end (stopped after `timeout` s: a hang fails, with its output) in its own
    process group, sampling every TCP socket it and its descendants listen on throughout (start,
    training, shutdown): (exit status, output, seen)."""
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads while it runs
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen: set[tuple[str, int, str, int]] = set()
    try:
        root, deadline = psutil.Process(proc.pid), time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen |= listeners(root)
            except psutil.NoSuchProcess:
                break
            time.sleep(every)
    finally:
        stop_group(proc)  # nothing left to stop if it ended; after a timeout, all of it
    with log:
        log.seek(0)
        return proc.returncode, log.read(), seen


def assert_loopback_only(seen: set[tuple[str, int, str, int]], workers: int) -> None:
    """The GCS, the raylet and every Ray Train worker were seen listening, all on loopback."""
    names = {s[2] for s in seen}
    assert {"gcs_server", "raylet"} <= names, sorted(names)
    assert len({s[3] for s in seen if s[2].startswith("ray::RayTrainW")}) == workers, seen
    wide = sorted(s for s in seen if not is_loopback(s[0]))
    assert not wide, f"listening beyond loopback: {wide}"
