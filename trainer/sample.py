"""Pull a registered generator by URI and write samples.

    python -m trainer.sample model=models:/stablegan-generator@latest num=64 out=grid.png
    python -m trainer.sample model=models:/stablegan-generator/3 num=1000 out=samples.npz seed=1
    python -m trainer.sample model=models:/digits-cond@champion labels=3,7 num=8 out=37.png

`.png` writes an image grid (a scatter plot for 2-D generators); `.npz` writes the raw
samples as array `samples` (N,C,H,W in [-1,1], or N,2), and `labels` for a conditional
generator. `labels=3,7` (conditional generators): `num` samples of each class, class by class;
without it a conditional generator draws its classes uniformly. From Python: `sample(...)`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.cli import run_command
from trainer.services import tracking
from trainer.train import plots


@dataclass
class SampleConfig:
    model: str = ""  # models:/NAME@ALIAS or models:/NAME/VERSION
    num: int = 64
    out: str = "samples.png"
    seed: int = 0
    labels: str = ""  # conditional generators: comma-separated classes, num samples of each
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here


def parse_labels(labels: str | list[int] | tuple[int, ...]) -> list[int]:
    """`3,7` or [3, 7] -> [3, 7]; a clear error for anything else."""
    if isinstance(labels, str):
        parts = [p.strip() for p in labels.split(",") if p.strip()]
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"labels={labels!r}: give class numbers separated by commas, e.g. labels=3,7")
        return [int(p) for p in parts]
    return [int(v) for v in labels]


@torch.no_grad()
def sample(
    model: str,
    num: int = 64,
    seed: int = 0,
    out: str | Path | None = None,
    tracking_uri: str = "",
    labels: str | list[int] | tuple[int, ...] = (),
) -> np.ndarray:
    """Load `model` (a models:/ URI), draw `num` samples with `seed` (`num` of each class in
    `labels` for a conditional generator), optionally write `out`."""
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    suffix = Path(out).suffix.lower() if out is not None else ""
    if out is not None and suffix not in (".png", ".npz"):
        raise ValueError(f"out={out!r}: use a .png (picture) or .npz (raw samples) path")
    classes = parse_labels(labels)
    uri = tracking.resolve_uri(tracking_uri)
    generator, latent_dim = tracking.load_generator(uri, model)
    if classes and not generator.num_classes:
        raise ValueError(f"{model} is not a conditional generator: sample it without labels=")
    if any(not 0 <= c < generator.num_classes for c in classes):
        raise ValueError(f"labels={classes}: {model} knows classes 0..{generator.num_classes - 1}")
    total = num * max(1, len(classes))
    z = torch.randn(total, latent_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor(classes).repeat_interleave(num) if classes else None
    samples = generator(z, y).float().numpy()  # y None: the generator's own classes, if any
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            extra = {"labels": y.numpy()} if y is not None else {}
            np.savez_compressed(path, samples=samples, **extra)
        elif samples.ndim == 2:
            path.write_bytes(plots.scatter_png(samples, title=model))
        else:
            path.write_bytes(plots.grid_png(torch.from_numpy(samples), nrow=num if classes else None))
    return samples


def main(argv: list[str] | None = None) -> int:
    def body(cfg: SampleConfig) -> None:
        if not cfg.model:
            raise ValueError("model=models:/NAME@ALIAS (or models:/NAME/VERSION) is required")
        samples = sample(cfg.model, cfg.num, cfg.seed, cfg.out, cfg.tracking_uri, cfg.labels)
        print(f"wrote {len(samples)} samples {tuple(samples.shape[1:])} from {cfg.model} to {cfg.out}")

    return run_command("sample", __doc__ or "", SampleConfig, argv, body)


if __name__ == "__main__":
    sys.exit(main())
