"""What the benchmarks share: a one-process torch.distributed group (DeepSpeed needs one), a
device sync for honest timings, and the machine's description for the results."""

from __future__ import annotations

import os
import platform
import socket

import torch


def init_dist(device: str) -> None:
    """A world of one on a free loopback port (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device == "cuda":
        torch.cuda.synchronize()


def machine(device: str, threads: int) -> str:
    """The GPU's name, or this host, its processor and the threads used."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.node()} ({platform.processor() or platform.machine()}), {threads} threads"
