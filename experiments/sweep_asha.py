"""ASHA against the full grid, one `stablegan tune` each, on the same 8 configurations of a small
image benchmark (digits32: learning rate x R1 gamma), the same seed and the same cluster:
whether ASHA finds the grid's best configuration (or one within noise of it), and for what
share of the CPU time. CPU time is the whole machine's (all cores, from /proc/stat) while a
sweep runs: run nothing else beside it.

    python -m experiments.sweep_asha run      # both sweeps, then the table
    python -m experiments.sweep_asha table    # the table again from the saved timings
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import ROOT

SPACE = '{optim.g_lr+optim.d_lr: "grid(1e-4, 3e-4, 1e-3, 3e-3)", penalty.weight: "grid(0.1, 1.0)"}'
METRIC = "eval/fid"  # FD on the digits classifier's features (digits32's eval.features=auto)


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (user + nice + system + irq + softirq)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / os.sysconf("SC_CLK_TCK")


def sweep_args(scheduler: str, store: Path, steps: int, seed: int) -> list[str]:
    return [
        "experiment=digits32",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={steps // 4}",
        f"trainer.seed={seed}",
        f"tune.space={SPACE}",
        f"tune.scheduler={scheduler}",
        f"tune.grace_steps={steps // 4}",
        "tune.reduction_factor=2",
        "tune.max_concurrent=2",
        f"tune.name=asha-vs-grid-{scheduler}",
        f"tune.storage_path={store / 'tune'}",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "tracking.register=false",
        "cluster.num_cpus=2",
    ]


def run(store: Path, steps: int, seed: int) -> None:
    store.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    timings = {}
    for scheduler in ("fifo", "asha"):
        args = sweep_args(scheduler, store, steps, seed)
        timings[scheduler] = timed_tune(args, env)
    (store / "timings.json").write_text(json.dumps({"steps": steps, "seed": seed, **timings}, indent=1))


def timed_tune(args: list[str], env: dict) -> dict[str, float]:
    """`python -m trainer.tune ARGS` to its end, its summary printed; the machine's CPU seconds
    and the wall seconds it took."""
    print("+ python -m trainer.tune", " ".join(args), flush=True)
    cpu0, t0 = machine_cpu_seconds(), time.time()
    done = subprocess.run(
        [sys.executable, "-m", "trainer.tune", *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    timing = {"cpu_s": machine_cpu_seconds() - cpu0, "wall_s": time.time() - t0}
    tail = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    print(f"  exit {done.returncode}, {timing}", *tail, sep="\n", flush=True)
    if done.returncode:
        print(done.stdout[-3000:] + done.stderr[-3000:], flush=True)
    return timing


def table(store: Path) -> None:
    saved = json.loads((store / "timings.json").read_text())
    grids = {s: rows(store / "tune" / f"asha-vs-grid-{s}" / "trials.csv") for s in ("fifo", "asha")}
    key = next(k for k in grids["fifo"][0] if k.startswith("optim."))
    full = {(r[key], r["penalty.weight"]): r for r in grids["fifo"]}
    print(f"digits32, {saved['steps']} steps, seed {saved['seed']}, 8 configurations ({SPACE})\n")
    print(f"| lr (G = D) | R1 gamma | grid: {METRIC} | grid: ended | ASHA: {METRIC} | ASHA: ended (step) |")
    print("|---|---|---|---|---|---|")
    asha = {(r[key], r["penalty.weight"]): r for r in grids["asha"]}
    for cfg, r in sorted(full.items(), key=lambda kv: float(kv[1][METRIC])):
        a = asha[cfg]
        print(
            f"| {cfg[0]} | {cfg[1]} | {float(r[METRIC]):.2f} | {r['ended']} | {float(a[METRIC]):.2f} | {a['ended']} ({a['step']}) |"
        )
    best = {
        s: min((r for r in g if r["ended"] == "completed"), key=lambda r: float(r[METRIC]))
        for s, g in grids.items()
    }
    f, a = saved["fifo"], saved["asha"]
    print(
        f"\ngrid's best: lr {best['fifo'][key]}, gamma {best['fifo']['penalty.weight']}: {float(best['fifo'][METRIC]):.2f}"
    )
    print(
        f"ASHA's best: lr {best['asha'][key]}, gamma {best['asha']['penalty.weight']}: {float(best['asha'][METRIC]):.2f}"
    )
    print(
        f"CPU seconds: grid {f['cpu_s']:.0f}, ASHA {a['cpu_s']:.0f} ({a['cpu_s'] / f['cpu_s']:.0%} of the grid's)"
    )
    print(f"wall seconds: grid {f['wall_s']:.0f}, ASHA {a['wall_s']:.0f}")


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "sweep_asha"))
    a = ap.parse_args()
    if a.command == "run":
        run(Path(a.store), a.steps, a.seed)
    table(Path(a.store))
