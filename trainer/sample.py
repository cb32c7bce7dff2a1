"""Pull a registered generator by URI and write samples.

    python -m trainer.sample model=models:/stablegan-generator@latest num=64 out=grid.png
    python -m trainer.sample model=models:/stablegan-generator/3 num=1000 out=samples.npz seed=1
    python -m trainer.sample model=models:/digits-cond@champion labels=3,7 num=8 out=37.png
    python -m trainer.sample model=models:/faces@champion num=50000 out=fid_samples/   # one PNG each
    python -m trainer.sample model=models:/faces@champion seeds=1,5,9-12 psi=0.7 out=picked.png
    python -m trainer.sample model=models:/faces@champion seeds=1,2,3 interpolate=16 out=walk.gif

Outputs by `out`: `.png` an image grid (a scatter plot for 2-D generators); `.npz` the raw
samples as array `samples` (N,C,H,W in [-1,1], or N,2), with `labels` and `seeds` where given;
a folder (`out=DIR/`, or any path without a suffix) one PNG per sample, for external FID tools;
`.gif` an animation (with `interpolate`).

- `labels=3,7` (conditional generators): `num` samples of each class, class by class; without
  it a conditional generator draws its classes from z as in training.
- `seeds=1,5,9-12`: one sample per seed (z drawn alone from that seed), instead of `num`
  samples from `seed`; the same seed gives the same image in every call.
- `psi=0.7`: truncation, z scaled by psi toward its mean (0): fewer odd samples, less variety
  (image generators; a conditional generator keeps the classes the untruncated z would pick).
- `interpolate=N`: N steps along the great circle between consecutive seeds' latents
  (`seeds`, default 0,1): `.png` one row per pair, `.gif` a loop through all of them.
- `device=auto` generates on the GPU when there is one, `batch_size` samples at a time.

From Python: `sample(...)`, which returns the samples as an array.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.config import TrackingKeys
from trainer.config.cli import run_command
from trainer.gan.models.blocks import labels_from_latent
from trainer.services import tracking
from trainer.train import plots


@dataclass
class SampleConfig:
    model: str = ""  # models:/NAME@ALIAS or models:/NAME/VERSION
    num: int = 64
    out: str = "samples.png"  # .png | .npz | .gif | a folder (one PNG per sample)
    seed: int = 0
    seeds: str = ""  # e.g. 1,5,9-12: one sample per seed, instead of num from seed
    labels: str = ""  # conditional generators: comma-separated classes, num samples of each
    psi: float = 1.0  # truncation: z scaled by psi (image generators)
    interpolate: int = 0  # steps between consecutive seeds' latents (.png rows or a .gif)
    device: str = "auto"  # auto = cuda when available
    batch_size: int = 256
    tracking: TrackingKeys = field(default_factory=TrackingKeys)  # tracking.uri


def parse_labels(labels: str | Sequence[int]) -> list[int]:
    """`3,7` or [3, 7] -> [3, 7]; a clear error for anything else."""
    if isinstance(labels, str):
        parts = [p.strip() for p in labels.split(",") if p.strip()]
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"labels={labels!r}: give class numbers separated by commas, e.g. labels=3,7")
        return [int(p) for p in parts]
    return [int(v) for v in labels]


def parse_seeds(seeds: str | Sequence[int]) -> list[int]:
    """`1,5,9-12` -> [1, 5, 9, 10, 11, 12]; a clear error for anything else."""
    if not isinstance(seeds, str):
        return [int(s) for s in seeds]
    out: list[int] = []
    for part in (p.strip() for p in seeds.split(",") if p.strip()):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise ValueError(
                f"seeds={seeds!r}: give seeds and ranges separated by commas, e.g. seeds=1,5,9-12"
            )
        out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return out


def output_kind(out: str | Path | None) -> str:
    """png | npz | gif | folder | none, from the `out` path; an error for anything else."""
    if out is None:
        return "none"
    suffix = Path(out).suffix.lower()
    if str(out).endswith(("/", "\\")) or not suffix:
        return "folder"
    if suffix not in (".png", ".npz", ".gif"):
        raise ValueError(f"out={out!r}: use a .png (picture), .npz (raw samples), .gif or a folder/ path")
    return suffix[1:]


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points along the great circle from `a` to `b` (rows), at fractions `t`: a Gaussian
    latent's norm stays typical all the way (a straight line would pass near the origin)."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.arccos(cos)[..., None]
    t = t[:, None]
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def draw_latents(latent_dim: int, num: int, seed: int, seeds: list[int]) -> torch.Tensor:
    """`num` latents from `seed`, or one latent per seed in `seeds` (each drawn alone)."""
    if seeds:
        return torch.cat(
            [torch.randn(1, latent_dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
    return torch.randn(num, latent_dim, generator=torch.Generator().manual_seed(seed))


def interpolation(keys: torch.Tensor, steps: int, loop: bool) -> torch.Tensor:
    """`steps` latents from each key to the next (ends included); `loop` closes the circle
    and leaves out each segment's end (the next one starts there), for a smooth animation."""
    ends = torch.cat([keys[1:], keys[:1]]) if loop else keys[1:]
    t = torch.linspace(0, 1, steps + 1)[:-1] if loop else torch.linspace(0, 1, steps)
    return torch.cat([slerp(a.expand(len(t), -1), b.expand(len(t), -1), t) for a, b in zip(keys, ends)])


@torch.no_grad()
def generate(
    generator: torch.nn.Module, z: torch.Tensor, y: torch.Tensor | None, batch_size: int, device: str
) -> np.ndarray:
    """Samples for latents `z` (and labels `y`), `batch_size` at a time on `device`."""
    parts = []
    for i in range(0, len(z), batch_size):
        yb = y[i : i + batch_size].to(device) if y is not None else None
        parts.append(generator(z[i : i + batch_size].to(device), yb).float().cpu())
    return torch.cat(parts).numpy()


def write(path: Path, kind: str, samples: np.ndarray, meta: dict, nrow: int | None) -> None:
    """Write `samples` as `kind` (see the module docstring) with `meta` (labels, seeds, model)."""
    if samples.ndim == 2 and kind in ("folder", "gif"):
        raise ValueError(f"{meta['model']} draws 2-D points: write them to a .png (scatter) or .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    images = torch.from_numpy(samples) if samples.ndim == 4 else None
    if kind == "npz":
        np.savez_compressed(
            path, samples=samples, **{k: np.asarray(v) for k, v in meta.items() if k != "model"}
        )
    elif kind == "png" and images is None:
        path.write_bytes(plots.scatter_png(samples, title=meta["model"]))
    elif kind == "png":
        path.write_bytes(plots.grid_png(images, nrow=nrow))
    elif kind == "folder":
        path.mkdir(parents=True, exist_ok=True)
        names = (
            [f"seed{s:06d}" for s in meta["seeds"]]
            if "seeds" in meta
            else [f"{i:06d}" for i in range(len(samples))]
        )
        if "labels" in meta:
            names = [f"class{c}_{n}" for c, n in zip(meta["labels"], names)]
        for name, img in zip(names, plots.to_uint8(images)):
            (path / f"{name}.png").write_bytes(plots.png_bytes(img))
    else:  # gif
        from PIL import Image

        frames = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in plots.to_uint8(images)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


@torch.no_grad()
def sample(
    model: str,
    num: int = 64,
    seed: int = 0,
    out: str | Path | None = None,
    tracking_uri: str = "",
    labels: str | Sequence[int] = (),
    *,
    seeds: str | Sequence[int] = (),
    psi: float = 1.0,
    interpolate: int = 0,
    device: str = "auto",
    batch_size: int = 256,
) -> np.ndarray:
    """Load `model` (a models:/ URI) and draw samples (see the module docstring for each
    option); optionally write them to `out`. Returns the samples, N first."""
    kind, classes, seed_list = output_kind(out), parse_labels(labels), parse_seeds(seeds)
    check_options(num, psi, interpolate, batch_size, kind, classes, seed_list)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    generator, latent_dim = tracking.load_generator(tracking.resolve_uri(tracking_uri), model)
    check_classes(model, generator.num_classes, classes)
    generator.to(device)  # exported in eval mode (an exported module has no .train/.eval)

    if interpolate:
        keys = draw_latents(latent_dim, 0, 0, seed_list or [0, 1])
        z = interpolation(keys, interpolate, loop=kind == "gif")
    else:
        z = draw_latents(latent_dim, num, seed, seed_list)
    per_class = len(z)
    y = torch.tensor(classes).repeat_interleave(per_class) if classes else None
    z = z.repeat(max(1, len(classes)), 1)
    if y is None and generator.num_classes:  # the classes the untruncated z picks, as in training
        y = labels_from_latent(z, generator.num_classes)
    samples = generate(generator, z * psi, y, batch_size, device)
    if psi != 1.0 and samples.ndim == 2:
        raise ValueError("psi= truncates image generators' latents; this one draws 2-D points")
    if out is not None:
        meta: dict = {"model": model}
        if classes:
            meta["labels"] = y.numpy()
        if seed_list and not interpolate:
            meta["seeds"] = seed_list * max(1, len(classes))
        nrow = interpolate or (per_class if classes else None)
        write(Path(out), kind, samples, meta, nrow)
    return samples


def check_options(
    num: int, psi: float, interpolate: int, batch_size: int, kind: str, classes: list[int], seeds: list[int]
) -> None:
    """Reject option combinations that cannot work, before the model is loaded."""
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    if not psi > 0:
        raise ValueError(f"psi={psi} must be > 0 (1 = no truncation; 0.5-0.8 is the usual range)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if interpolate < 0 or interpolate == 1:
        raise ValueError(f"interpolate={interpolate}: give 2 or more steps between seeds (0 = off)")
    if interpolate and len(seeds) == 1:
        raise ValueError("interpolate= needs two or more seeds, e.g. seeds=1,2,3 (default 0,1)")
    if kind == "gif" and not interpolate:
        raise ValueError("a .gif is an interpolation: add interpolate=N (and seeds=...)")
    if interpolate and len(classes) > 1:
        raise ValueError("interpolate= takes at most one class: labels=3")


def check_classes(model: str, num_classes: int, classes: list[int]) -> None:
    if classes and not num_classes:
        raise ValueError(f"{model} is not a conditional generator: sample it without labels=")
    if any(not 0 <= c < num_classes for c in classes):
        raise ValueError(f"labels={classes}: {model} knows classes 0..{num_classes - 1}")


def main(argv: list[str] | None = None) -> int:
    def body(cfg: SampleConfig) -> None:
        if not cfg.model:
            raise ValueError("model=models:/NAME@ALIAS (or models:/NAME/VERSION) is required")
        samples = sample(
            cfg.model,
            cfg.num,
            cfg.seed,
            cfg.out,
            cfg.tracking.uri,
            cfg.labels,
            seeds=cfg.seeds,
            psi=cfg.psi,
            interpolate=cfg.interpolate,
            device=cfg.device,
            batch_size=cfg.batch_size,
        )
        print(f"wrote {len(samples)} samples {tuple(samples.shape[1:])} from {cfg.model} to {cfg.out}")

    return run_command("sample", __doc__ or "", SampleConfig, argv, body)


if __name__ == "__main__":
    sys.exit(main())
