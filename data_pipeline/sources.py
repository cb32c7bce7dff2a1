"""Sample sources for `make_shards`: folders of images, .npz arrays, bundled digits, 2-D mixtures.

Every source returns a `Source`: a deterministic, ordered list of records plus what the manifest
needs to describe them. Images are uint8 arrays (H, W) or (H, W, C); points are float32 (2,).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The standard 2-D mode-collapse benchmarks (VEEGAN / PacGAN definitions).
RING8_SIGMA = 0.01
GRID25_SIGMA = 0.05


def ring8_modes() -> np.ndarray:
    """The 8 mode centres of `ring8`: unit circle at angles 2*pi*i/8."""
    angles = 2 * math.pi * np.arange(8) / 8
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def grid25_modes() -> np.ndarray:
    """The 25 mode centres of `grid25`: {-4,-2,0,2,4}^2."""
    axis = np.arange(-4, 5, 2, dtype=np.float32)
    return np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)


MIXTURES: dict[str, tuple[Callable[[], np.ndarray], float]] = {
    "ring8": (ring8_modes, RING8_SIGMA),
    "grid25": (grid25_modes, GRID25_SIGMA),
}


@dataclass
class Source:
    """An ordered collection ready to be written: `load(i)` gives record i."""

    kind: str  # "image" or "points"
    size: int
    load: Callable[[int], np.ndarray | None]  # None: unreadable, skipped and counted
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.size


def square_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square, then resize to `resolution` with a high-quality filter."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img


def _to_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; use channels=1 or channels=3")
    return "L" if channels == 1 else "RGB"


def folder_source(src: str, resolution: int, channels: int) -> Source:
    """Images under `src` (nested folders allowed); class = first-level subfolder, if any."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"src={src!r} is not a folder; pass src=PATH to a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"src={src!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); point src at a folder of images"
        )
    rel = [p.relative_to(root) for p in files]
    has_classes = all(len(r.parts) > 1 for r in rel)
    classes = sorted({r.parts[0] for r in rel}) if has_classes else []
    labels = np.array([classes.index(r.parts[0]) for r in rel], dtype=np.int64) if has_classes else None
    mode = _to_mode(channels)

    def load(i: int) -> np.ndarray | None:
        try:
            with Image.open(files[i]) as img:
                img.load()
                out = square_resize(img.convert(mode), resolution)
            return np.asarray(out, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            warnings.warn(f"skipping unreadable image {files[i]}: {exc}", stacklevel=2)
            return None

    return Source("image", len(files), load, labels, classes, {"src": str(root)})


def npz_source(src: str, resolution: int, channels: int, key: str = "", label_key: str = "") -> Source:
    """uint8 images (N,H,W) or (N,H,W,C) from a .npz file, with optional labels."""
    path = Path(src).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"src={src!r} does not exist; pass src=PATH to a .npz file")
    with np.load(path, allow_pickle=False) as data:
        names = list(data.keys())
        if key and key not in names:
            raise KeyError(f"key={key!r} is not in {path}; arrays there: {names}")
        image_key = key or next(
            (k for k in names if data[k].dtype == np.uint8 and data[k].ndim in (3, 4)), None
        )
        if image_key is None:
            raise ValueError(
                f"{path} has no uint8 array shaped (N,H,W) or (N,H,W,C); arrays: "
                f"{[(k, data[k].dtype.name, data[k].shape) for k in names]}"
            )
        images = data[image_key]
        lkey = label_key or next((k for k in ("y", "labels", "y_train") if k in names), "")
        labels = data[lkey].astype(np.int64) if lkey else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{path}[{image_key}] must be uint8 (N,H,W) or (N,H,W,C), got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ValueError(f"{path}[{image_key}] is empty")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    mode = _to_mode(channels)

    def load(i: int) -> np.ndarray:
        arr = images[i]
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        return np.asarray(square_resize(img.convert(mode), resolution), dtype=np.uint8)

    classes = [str(c) for c in np.unique(labels)] if labels is not None else []
    return Source("image", len(images), load, labels, classes, {"src": str(path), "key": image_key})


def digits_source(resolution: int, channels: int) -> Source:
    """scikit-learn's bundled 1,797 real 8x8 handwritten digits, upscaled (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16 ink intensity: bright strokes on black, like MNIST.
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    mode = _to_mode(channels)

    def load(i: int) -> np.ndarray:
        img = Image.fromarray(images[i]).resize((resolution, resolution), Image.Resampling.BICUBIC)
        return np.asarray(img.convert(mode), dtype=np.uint8)

    labels = digits.target.astype(np.int64)
    return Source("image", len(images), load, labels, [str(c) for c in range(10)], {})


def stacked_digits_source(num_samples: int, seed: int, resolution: int = 32) -> Source:
    """Three random digits stacked as the R, G and B channels: 1,000 classes (100*r + 10*g + b).

    The Stacked-MNIST construction of VEEGAN and PacGAN, on scikit-learn's 1,797 digits (each
    upscaled as `digits_source` does). Deterministic in `seed`; labels stored.
    """
    digits = digits_source(resolution, 1)
    base = np.stack([digits.load(i) for i in range(len(digits))])
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(base), size=(num_samples, 3))
    labels = (digits.labels[picks] * np.array([100, 10, 1])).sum(1)
    return Source(
        "image",
        num_samples,
        lambda i: np.ascontiguousarray(base[picks[i]].transpose(1, 2, 0)),
        labels.astype(np.int64),
        [f"{c:03d}" for c in range(1000)],
        {"num_samples": num_samples, "num_modes": 1000},
    )


def mixture_source(name: str, num_samples: int, seed: int) -> Source:
    """`num_samples` points from the ring8 / grid25 Gaussian mixtures (uniform over modes)."""
    modes_fn, sigma = MIXTURES[name]
    modes = modes_fn()
    rng = np.random.default_rng(seed)
    which = rng.integers(len(modes), size=num_samples)
    points = (modes[which] + sigma * rng.standard_normal((num_samples, 2))).astype(np.float32)
    return Source(
        "points",
        num_samples,
        lambda i: points[i],
        which.astype(np.int64),
        [f"mode{i}" for i in range(len(modes))],
        {"num_samples": num_samples, "sigma": sigma, "num_modes": len(modes)},
    )


def iter_records(source: Source, order: np.ndarray) -> Iterator[tuple[int, np.ndarray | None]]:
    """Records in write order: (original index, array or None if unreadable)."""
    for i in order:
        yield int(i), source.load(int(i))
