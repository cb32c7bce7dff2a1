"""Augmentation for small data: `experiment=digits32` trained on a 10 % subset of the digits
(180 images) with D's inputs as they are, with DiffAugment, and with ADA; each scored against
the whole digits set (1,797 images: the 180 and 1,617 it never saw) by `eval.urls`.

    python -m experiments.augmentation run [--seeds 1000,1001,1002] [--steps 1000] [--store DIR]
    python -m experiments.augmentation table [--store DIR]

Rows: the whole set against itself (half vs half: the floor), the 180 training images against
the whole set (what a perfect memorizer of the subset scores), then each method, mean ± sd over
the held-out seeds. Leak check: the digits classifier's mean top probability on 2,000 samples of
each final EMA generator beside the real digits' (a generator that learned the augmentation,
shifted digits, cut squares, tinted strokes, makes digits the classifier is less sure of).
No run of this benchmark tuned anything: the seeds are held out (1000 and up), and the
augmentation settings are the published defaults (DiffAugment's policy, ADA's target 0.6).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from experiments.common import cli, finished_runs, mean_sd, train_each

METHODS = {
    "no_augmentation": [],
    "diffaugment": ["augment=diffaugment"],
    "ada": ["augment=ada"],
}
KEYS = ("fid", "precision", "recall", "coverage", "memorization")


def make_data(store: Path) -> tuple[Path, Path]:
    from data_pipeline.make_shards import MakeShardsConfig, write_shards

    full, subset = store / "shards" / "digits", store / "shards" / "digits10"
    if not (full / "manifest.json").exists():
        write_shards(MakeShardsConfig(source="digits", out=str(full)), progress=False)
    if not (subset / "manifest.json").exists():
        write_shards(MakeShardsConfig(source="digits", out=str(subset), fraction=0.1), progress=False)
    return full, subset


def run(store: Path, seeds: list[int], steps: int, methods: list[str]) -> None:
    full, subset = make_data(store)
    train_each(
        store,
        [
            (
                f"{method} seed {seed}",
                [
                    "experiment=digits32",
                    *METHODS[method],
                    f"data.urls={subset}",
                    f"eval.urls={full}",
                    "eval.every=0",
                    f"trainer.seed={seed}",
                    f"trainer.max_steps={steps}",
                    f"trainer.run_name=aug-{method}-s{seed}-{steps}",
                    f"trainer.storage_path={store / 'runs'}",
                    "trainer.sample_every=0",
                    "trainer.checkpoint_every=500",
                    "data.loader_workers=1",
                    "tracking.register=false",
                    "tracking.experiment=augmentation",
                    f"name={method}",
                ],
            )
            for method in methods
            for seed in seeds
        ],
    )


@torch.no_grad()
def confidence(images: torch.Tensor) -> float:
    """The digits classifier's mean top probability on (N, 1, 32, 32) images in [-1, 1]."""
    from trainer.eval import digits

    return float(digits.load()(images).softmax(1).amax(1).mean())


def sample_confidence(run_dir: Path) -> float:
    from trainer.config import from_dict
    from trainer.services.conclude import build_generator

    cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
    G = build_generator(cfg, torch.load(run_dir / "generator_ema.pt", weights_only=True)).eval()
    z = torch.randn(2000, cfg.model.latent_dim, generator=torch.Generator().manual_seed(7))
    return confidence(G(z))


def collect(store: Path) -> list[dict]:
    rows: dict[tuple[str, int, int], dict] = {}  # a rerun replaces the older run
    for r in finished_runs(store, "augmentation"):
        m, p = r.data.metrics, r.data.params
        if "eval/fid" not in m:
            continue
        steps, seed = int(p["trainer.max_steps"]), int(p["trainer.seed"])
        rows[(p["name"], seed, steps)] = {
            "method": p["name"],
            "seed": seed,
            "steps": steps,
            "cpu_seconds": m.get("train_cpu_seconds"),
            "confidence": sample_confidence(store / "runs" / p["trainer.run_name"]),
            **{k: m.get(f"eval/{k}", math.nan) for k in KEYS},  # nan: measured before the metric
        }
    return list(rows.values())


def data_rows(store: Path) -> dict[str, dict]:
    from trainer.config import EvalConfig
    from trainer.eval import metrics
    from trainer.eval.evaluator import Evaluator

    full, subset = make_data(store)
    opts = EvalConfig(features="digits", num=10_000)
    whole = Evaluator(str(full), opts, progress=False)
    sub = Evaluator(str(subset), opts, progress=False)
    memorizer = metrics.image_metrics(whole.real, sub.real, opts.nearest_k, opts.seed, opts.kid_subsets)
    images = torch.cat(list(whole._real_images(len(whole.real))))
    return {
        "whole set, half vs half (the floor)": {**whole.data_row().metrics, "confidence": confidence(images)},
        "the 180 training images vs the whole set (a memorizer)": memorizer,
    }


def table(store: Path) -> dict:
    rows, data = collect(store), data_rows(store)
    seeds = sorted({r["seed"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    cols = (*KEYS, "confidence")
    lines = [
        f"Digits, 10 % subset (180 images) for training, scored against all 1,797; held-out seeds "
        f"{seeds}; {steps} steps; experiment=digits32; mean ± sd over seeds",
        "",
        "| method | runs | FD-digits | precision | recall | coverage | memorization "
        "| classifier confidence on samples | training CPU s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in data.items():
        lines.append(f"| {name} | | " + " | ".join(f"{m[k]:.3g}" if k in m else "" for k in cols) + " | |")
    for method in METHODS:
        sub = [r for r in rows if r["method"] == method]
        if sub:
            cpu = statistics.fmean(r["cpu_seconds"] for r in sub if r["cpu_seconds"] is not None)
            cells = " | ".join(mean_sd([r[k] for r in sub]) for k in cols)
            lines.append(f"| {method} | {len(sub)} | {cells} | {cpu:.0f} |")
    print("\n".join(lines))
    return {"rows": rows, "data": data, "seeds": seeds, "markdown": "\n".join(lines)}


def main() -> None:
    cli(__doc__ or "", "augmentation", list(METHODS), run, table, steps=1000)


if __name__ == "__main__":
    main()
