"""ASHA against the full grid, one `stablegan tune` each, on the same 8 configurations of a small
image benchmark (digits32: learning rate x R1 gamma), the same seed and the same cluster:
whether ASHA finds the grid's best configuration (or one within noise of it), and for what
share of the CPU time. CPU time is the whole machine's (all cores, from /proc/stat) while a
sweep runs: run nothing else beside it.

    python -m experiments.sweep_asha run      # the grid, ASHA in two orders, then the table
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


def sweep_args(scheduler: str, store: Path, steps: int, seed: int, order: int) -> list[str]:
    """ASHA in its usual geometry: rungs a factor 3 apart from a ninth of the run (evaluated
    every eighth: rungs at steps 75 and 225 of 600); the grid with the same evaluations."""
    return [
        "experiment=digits32",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={steps // 8}",
        f"trainer.seed={seed}",
        f"tune.space={SPACE}",
        f"tune.scheduler={scheduler}",
        f"tune.grace_steps={steps // 9}",
        "tune.reduction_factor=3",
        f"tune.seed={order}",  # the order the grid's points run in
        "tune.max_concurrent=2",
        f"tune.name={name(scheduler, order)}",
        f"tune.storage_path={store / 'tune'}",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "tracking.register=false",
        "cluster.num_cpus=2",
    ]


def name(scheduler: str, order: int) -> str:
    return f"asha-vs-grid-{scheduler}" + (f"-order{order}" if scheduler == "asha" else "")


def run(store: Path, steps: int, seed: int, orders: list[int]) -> None:
    """The grid once (its order changes nothing), ASHA once per order of the same points."""
    store.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    saved = store / "timings.json"
    timings = json.loads(saved.read_text()) if saved.exists() else {"steps": steps, "seed": seed}
    for scheduler, order in [("fifo", 0)] + [("asha", k) for k in orders]:
        if name(scheduler, order) not in timings:
            timings[name(scheduler, order)] = timed_tune(
                sweep_args(scheduler, store, steps, seed, order), env
            )
            saved.write_text(json.dumps(timings, indent=1))


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
    names = [k for k in saved if k.startswith("asha-vs-grid-")]
    grids = {k: rows(store / "tune" / k / "trials.csv") for k in names}
    grid, ashas = grids[name("fifo", 0)], [k for k in names if k != name("fifo", 0)]
    key = next(k for k in grid[0] if k.startswith("optim."))

    def point(r: dict) -> tuple[str, str]:
        return r[key], r["penalty.weight"]

    print(f"digits32, {saved['steps']} steps, seed {saved['seed']}, 8 configurations ({SPACE})\n")
    heads = "".join(f" {k.rsplit('-', 1)[1]}: {METRIC} (ended, step) |" for k in ashas)
    print(f"| lr (G = D) | R1 gamma | grid: {METRIC} |{heads}")
    print("|---|---|---|" + "---|" * len(ashas))
    by_point = {k: {point(r): r for r in grids[k]} for k in ashas}
    for r in sorted(grid, key=lambda r: float(r[METRIC])):
        cells = "".join(f" {cell(by_point[k][point(r)])} |" for k in ashas)
        print(f"| {point(r)[0]} | {point(r)[1]} | {float(r[METRIC]):.2f} |{cells}")
    full = saved[name("fifo", 0)]
    print(f"\ngrid: best {best(grid, key)}; CPU {full['cpu_s']:.0f} s, wall {full['wall_s']:.0f} s")
    for k in ashas:
        a = saved[k]
        print(
            f"ASHA {k.rsplit('-', 1)[1]}: best {best(grids[k], key)}; CPU {a['cpu_s']:.0f} s "
            f"({a['cpu_s'] / full['cpu_s']:.0%} of the grid's), wall {a['wall_s']:.0f} s"
        )
    curves(store, {r["trial"]: point(r) for r in grid})


def curves(store: Path, points: dict[str, tuple[str, str]]) -> None:
    """The grid's in-training metric at every evaluation, per configuration (each run is
    deterministic, so an ASHA trial's values up to its stop are these), and the least share of
    the grid's steps any early stopping could spend and still keep the grid's best: every
    trial up to the first evaluation from which the best leads at every later one, the best
    alone after it."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`stablegan.sweep` = '{name('fifo', 0)}'",
    )
    series = {}
    for run in (r for r in runs if r.data.tags.get("stablegan.trial") in points):  # not the parent
        history = client.get_metric_history(run.info.run_id, METRIC)
        series[points[run.data.tags["stablegan.trial"]]] = {m.step: m.value for m in history}
    steps = sorted({s for h in series.values() for s in h})
    print(f"\n| lr (G = D) | R1 gamma | {METRIC} at step " + " | ".join(map(str, steps)) + " |")
    print("|---|---|" + "---|" * len(steps))
    final = max(steps)
    for point, h in sorted(series.items(), key=lambda kv: kv[1][final]):
        print(f"| {point[0]} | {point[1]} | " + " | ".join(f"{h[s]:.1f}" for s in steps) + " |")
    leader = min(series, key=lambda p: series[p][final])
    leads = [
        s
        for s in steps
        if all(series[leader][t] == min(h[t] for h in series.values()) for t in steps if t >= s)
    ]
    first = min(leads)
    share = (len(series) * first + (final - first)) / (len(series) * final)
    print(
        f"\nthe grid's best leads from step {first} on: early stopping keeps it for at least {share:.0%} of the grid's steps"
    )


def cell(r: dict) -> str:
    ended = "completed" if r["ended"] == "completed" else f"{r['ended']}, {r['step']}"
    return f"{float(r[METRIC]):.2f} ({ended})"


def best(rows_: list[dict], key: str) -> str:
    done = min((r for r in rows_ if r["ended"] == "completed"), key=lambda r: float(r[METRIC]))
    return f"lr {done[key]}, gamma {done['penalty.weight']}: {float(done[METRIC]):.2f}"


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", default="0,1", help="tune.seed of each ASHA sweep (the grid's order)")
    ap.add_argument("--store", default=str(ROOT / "runs" / "experiments" / "sweep_asha"))
    a = ap.parse_args()
    if a.command == "run":
        run(Path(a.store), a.steps, a.seed, [int(k) for k in a.orders.split(",")])
    table(Path(a.store))
