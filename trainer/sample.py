"""Pull a registered generator by URI and write samples.

    python -m trainer.sample model=models:/stablegan-generator@latest num=64 out=grid.png
    python -m trainer.sample model=models:/stablegan-generator/3 num=1000 out=samples.npz seed=1

`.png` writes an image grid (a scatter plot for 2-D generators); `.npz` writes the raw
samples as array `samples` (N,C,H,W in [-1,1], or N,2). From Python: `sample(...)`.
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
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here


@torch.no_grad()
def sample(
    model: str, num: int = 64, seed: int = 0, out: str | Path | None = None, tracking_uri: str = ""
) -> np.ndarray:
    """Load `model` (a models:/ URI), draw `num` samples with `seed`, optionally write `out`."""
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    suffix = Path(out).suffix.lower() if out is not None else ""
    if out is not None and suffix not in (".png", ".npz"):
        raise ValueError(f"out={out!r}: use a .png (picture) or .npz (raw samples) path")
    uri = tracking.resolve_uri(tracking_uri)
    generator, latent_dim = tracking.load_generator(uri, model)
    z = torch.randn(num, latent_dim, generator=torch.Generator().manual_seed(seed))
    samples = generator(z).float().numpy()
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            np.savez_compressed(path, samples=samples)
        elif samples.ndim == 2:
            path.write_bytes(plots.scatter_png(samples, title=model))
        else:
            path.write_bytes(plots.grid_png(torch.from_numpy(samples)))
    return samples


def main(argv: list[str] | None = None) -> int:
    def body(cfg: SampleConfig) -> None:
        if not cfg.model:
            raise ValueError("model=models:/NAME@ALIAS (or models:/NAME/VERSION) is required")
        samples = sample(cfg.model, cfg.num, cfg.seed, cfg.out, cfg.tracking_uri)
        print(f"wrote {len(samples)} samples {tuple(samples.shape[1:])} from {cfg.model} to {cfg.out}")

    return run_command("sample", __doc__ or "", SampleConfig, argv, body)


if __name__ == "__main__":
    sys.exit(main())
