"""The embedded single-machine Ray (no `cluster.address`): every server it starts, and the
workers' torch.distributed rendezvous, listen on 127.0.0.1 only.

- Ray binds its gRPC servers (GCS, raylet, core workers, agents) to loopback only when the
  node's address is 127.0.0.1 itself; any other address, 127.0.0.100 included, gets the
  wildcard. It also turns a given 127.0.0.1 into the host's outward address unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is off: Ray's single-machine mode, its default on macOS and
  Windows. Ray reads that switch when it is imported, so `start` sets it for the call (and the
  processes the call starts) and puts it back after.
- torch's TCPStore, which Ray Train's `env://` and `tcp://` rendezvous create on rank 0,
  always listens on all interfaces. On one machine the workers share a file system, so
  `LocalTorchConfig` meets them at a FileStore instead (`file://`, a fresh file per start, as
  a restart after a failure needs): no TCP listener at all. gloo's own pairs bind to the
  node's address, which is loopback here.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import (
    _set_torch_distributed_env_vars,
    _setup_torch_process_group,
    _TorchBackend,
)

LOCAL_IP = "127.0.0.1"


def start(num_cpus: int | None) -> None:
    """Start a new one-node Ray of our own on 127.0.0.1 and connect to it."""
    from ray._private import ray_constants

    with socket.socket() as s:
        s.bind((LOCAL_IP, 0))
        dashboard_port = s.getsockname()[1]
    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(
            # "local": a new Ray of our own, never one a past `ray start` left recorded.
            address="local",
            _node_ip_address=LOCAL_IP,
            include_dashboard=True,
            dashboard_host=LOCAL_IP,
            dashboard_port=dashboard_port,
            # Ray Train's placement-group cleaner asks the state API whether the controller
            # lives; unpointed, it finds *another* Ray on the machine, sees no controller
            # there and kills our workers (seen here beside launch/local_cluster.sh).
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://{LOCAL_IP}:{dashboard_port}"}},
            num_cpus=num_cpus,
            log_to_driver=True,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved[0]


def is_local() -> bool:
    """Whether the connected Ray runs on this machine alone: its node address is 127.0.0.1
    (the embedded Ray `start` makes, or any single-machine Ray on loopback), so every training
    worker can meet through a file rendezvous."""
    return ray.is_initialized() and ray.util.get_node_ip_address() == LOCAL_IP


class _FileStoreBackend(_TorchBackend):
    """Ray Train's torch backend with a `file://` rendezvous instead of a TCPStore."""

    def on_start(self, worker_group, backend_config: LocalTorchConfig) -> None:  # noqa: ANN001
        path = Path(tempfile.gettempdir()) / f"stablegan-rendezvous-{uuid.uuid4().hex}"
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _setup_torch_process_group,
                    backend=backend_config.backend or "gloo",
                    world_rank=rank,
                    world_size=len(worker_group),
                    init_method=f"file://{path}",
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )


@dataclass
class LocalTorchConfig(TorchConfig):
    """`TorchConfig` for workers that all run on this machine: a FileStore rendezvous."""

    @property
    def backend_cls(self):  # noqa: ANN201 - Ray's own signature
        return _FileStoreBackend
