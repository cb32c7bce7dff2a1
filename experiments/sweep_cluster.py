"""A sweep over the two nodes of `launch/local_cluster.sh` (a Ray head on 127.0.0.2 and a worker
node on 127.0.0.3, each with one `stablegan_slot`, and its MLflow server): two grid25 trials at
once, each training worker asking for a slot, so one trial lands on each node. Prints the
trials' table with the node each trained on, then stops the cluster.

    python -m experiments.sweep_cluster
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(store: Path) -> int:
    store.mkdir(parents=True, exist_ok=True)
    script = str(ROOT / "launch" / "local_cluster.sh")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "STABLEGAN_RAY_PORT": str(free_port()),
        "STABLEGAN_DASHBOARD_PORT": str(free_port()),
        "STABLEGAN_MLFLOW_PORT": str(free_port()),
        "STABLEGAN_MLFLOW_DIR": str(store / "mlflow"),
        "STABLEGAN_STATE_DIR": str(store / "cluster"),
        "RAY_AUTH_MODE": "token",  # the cluster's jobs and clients authenticate (up makes the token)
    }
    try:
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=300)
        print(up.stdout, flush=True)
        info = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line and line[0] != "#")
        args = [
            "experiment=grid25",
            "trainer.max_steps=300",
            "trainer.checkpoint_every=100",
            "trainer.log_every=50",
            "trainer.worker_resources={stablegan_slot:1}",
            'tune.space={optim.g_lr: "grid(3e-4, 1e-3)"}',
            "tune.scheduler=fifo",
            "tune.max_concurrent=2",
            "tune.name=two-nodes",
            f"tune.storage_path={store / 'tune'}",
            f"cluster.address={info['RAY_ADDRESS']}",
            f"tracking.uri={info['MLFLOW_TRACKING_URI']}",
        ]
        print("+ python -m trainer.tune", " ".join(args), flush=True)
        t0 = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "trainer.tune", *args], env=env, cwd=ROOT, capture_output=True, text=True
        )
        print(f"exit {done.returncode} after {time.time() - t0:.0f}s")
        print("\n".join(line for line in done.stdout.splitlines() if line.startswith("  ")))
        if done.returncode:
            print(done.stdout[-3000:] + done.stderr[-3000:])
            return done.returncode
        with open(store / "tune" / "two-nodes" / "trials.csv") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            print(
                f"trial {row['trial']}: optim.g_lr={row['optim.g_lr']} {row['ended']} at step {row['step']} on node {row['node']}"
            )
        nodes = {row["node"] for row in rows}
        print(f"nodes used: {sorted(nodes)}")
        return 0 if len(nodes) == 2 else 1
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True, timeout=120)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "sweep_cluster"))
    sys.exit(main(Path(ap.parse_args().store)))
