"""What a sweep leaves for its reader: the trials' table, the robustness report (per setting,
over seeds: how many runs converged, the metric's spread) and the robustness picture.

A row is one trial: its settings, the step it reached, its metrics at that step, and how it
ended (completed, stopped early, diverged, failed).
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

from trainer.config import ConfigError
from trainer.train import plots

ENDINGS = ("completed", "stopped early", "diverged", "failed")
_CONDITION = re.compile(r"(eval/[\w/]+)\s*(>=|<=|>|<)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)")
SEED = "trainer.seed"


def parse_condition(text: str) -> tuple[str, str, float] | None:
    """`tune.converged` ("eval/modes>=990") as (metric, operator, value); None when empty."""
    if not text:
        return None
    match = _CONDITION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"tune.converged={text!r}: write METRIC OP VALUE with an in-training metric, e.g. "
            "eval/modes>=990 or eval/fid<20"
        )
    return match.group(1), match.group(2), float(match.group(3))


def converged(row: dict, condition: tuple[str, str, float] | None) -> bool:
    """A completed trial that meets the condition at its last step (any completed one without)."""
    if row["ended"] != "completed":
        return False
    if condition is None:
        return True
    metric, op, bound = condition
    value = row.get(metric, math.nan)
    return {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[op]


def summary(rows: list[dict], metric: str, condition: tuple[str, str, float] | None) -> dict[str, str]:
    """How many trials ended how, how many converged, and the metric's spread over the completed."""
    counts = {e: sum(r["ended"] == e for r in rows) for e in ENDINGS}
    values = sorted(r[metric] for r in rows if r["ended"] == "completed" and math.isfinite(r[metric]))
    spread = "no completed trial"
    if values:
        spread = f"{metric} min {values[0]:.4g}, median {values[len(values) // 2]:.4g}, max {values[-1]:.4g}"
    n = sum(converged(r, condition) for r in rows)
    what = "".join(map(str, condition)) if condition else "completed without diverging"
    return {
        "trials": f"{len(rows)} (" + ", ".join(f"{k} {e}" for e, k in counts.items()) + ")",
        "converged": f"{n} of {len(rows)} ({what})",
        "spread": spread,
    }


def write_table(rows: list[dict], keys: list[str], metrics: list[str], root: Path) -> Path:
    path = root / "trials.csv"
    columns = ["trial", *keys, "step", *metrics, "ended", "lineage", "node"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report(rows: list[dict], keys: list[str], metric: str, condition, root: Path, title: str) -> Path:
    """robustness.md: one line per setting (seeds pooled): runs, converged, the metric's mean
    and standard deviation over the completed runs, diverged, stopped early."""
    settings = [k for k in keys if k != SEED]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in settings), []).append(row)
    what = "".join(map(str, condition)) if condition else "completed without diverging"
    lines = [
        f"# {title}: robustness",
        "",
        f"A run converged: {what}, judged at its last step. {metric}: mean ± sd over completed runs.",
        "",
        "| " + " | ".join([*settings, "runs", "converged", metric, "diverged", "stopped early"]) + " |",
        "|" + "---|" * (len(settings) + 5),
    ]
    for values, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        done = [r[metric] for r in group if r["ended"] == "completed" and math.isfinite(r[metric])]
        cell = "n/a"
        if done:
            sd = statistics.stdev(done) if len(done) > 1 else 0.0
            cell = f"{statistics.fmean(done):.4g} ± {sd:.2g}"
        counts = [sum(r["ended"] == e for r in group) for e in ("diverged", "stopped early")]
        n = sum(converged(r, condition) for r in group)
        cells = [*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values), str(len(group))]
        lines.append("| " + " | ".join([*cells, f"{n} of {len(group)}", cell, *map(str, counts)]) + " |")
    path = root / "robustness.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_picture(
    rows: list[dict], keys: list[str], log_keys: set[str], metric: str, root: Path, title: str
) -> Path:
    path = root / "robustness.png"
    path.write_bytes(plots.sweep_png(rows, keys, log_keys, metric, title))
    return path
