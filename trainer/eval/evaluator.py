"""Score a generator against a shard set: the real side computed once and cached.

`Evaluator(urls, opts)` reads the shards' manifest to decide what to measure:

- images: features of up to `opts.num` real images (cached under
  `$STABLEGAN_CACHE/real/`, keyed by the manifest's sha256, the feature network and the count),
  then FID, KID, precision, recall, density and coverage of `opts.num` generated samples; on
  stacked digits also the modes covered and their KL over `opts.mode_samples` samples;
- 2-D mixtures: the mode metrics, spread and the sliced Wasserstein distance to fresh draws.

`data_row()` scores the real data the same way (a second, disjoint draw or split): the ceiling
that every table prints beside a generator's row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline import objstore
from data_pipeline.shards import ShardList, local_path, resolve, sha256_file
from data_pipeline.sources import MIXTURES, mixture_source
from data_pipeline.stream import ShardLoader, StreamConfig
from trainer.config import EvalConfig
from trainer.eval import features, metrics

log = logging.getLogger("stablegan.eval")
Generator = Callable[[torch.Tensor], torch.Tensor]
STACKED = "stacked_digits"


@dataclass
class Result:
    """Metric values and what they were measured with (logged beside them)."""

    metrics: dict[str, float]
    info: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())


def data_identity(shards: ShardList) -> str:
    """A sha256 that names the shard set's content, wherever it lives: its manifest (which holds
    each shard's sha256) for local and s3:// shards alike; without one, the local files' own
    bytes, or the objects' ETags and sizes in a bucket. '' for a source with no identity (a
    `pipe:` command): such data is never compared."""
    if shards.manifest is not None:
        return hashlib.sha256(json.dumps(shards.manifest, sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256()
    for url in shards.urls:
        path = local_path(url)
        if path is not None and path.is_file():
            digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
        elif objstore.is_s3(url):
            bucket, key = objstore.split(url)
            head = objstore.client().head_object(Bucket=bucket, Key=key)
            digest.update(f"{key}:{head['ETag']}:{head['ContentLength']}\n".encode())
        else:
            return ""
    return digest.hexdigest() if shards.urls else ""


KEY_PARTS = ("data_sha256", "features", "num_real", "num_fake", "seed")


def evaluation_key(info: dict[str, str]) -> str:
    """What an evaluation's value depends on, as one short hash: two scores compare only when
    their keys are equal (data identity, feature network and its weights, both sample counts,
    the latent seed)."""
    return hashlib.sha256(json.dumps([str(info.get(p, "")) for p in KEY_PARTS]).encode()).hexdigest()[:16]


def feature_spec(opts: EvalConfig, manifest: dict | None) -> str:
    """`eval.features`, with `auto` = digits for digit data, else inception."""
    if opts.features != "auto":
        return opts.features
    return "digits" if (manifest or {}).get("source") in ("digits", STACKED) else "inception"


@torch.no_grad()
def generate(
    G: Generator, latent_dim: int, num: int, batch: int, seed: int, device: str
) -> Iterator[torch.Tensor]:
    """`num` samples in batches, from latents seeded by `seed` (float32, on `device`)."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, num, batch):
        z = torch.randn(min(batch, num - start), latent_dim, generator=gen)
        yield G(z.to(device)).float()


class NonFiniteSamples(ValueError):
    """The generator produced NaN or infinite values: it diverged, and there is nothing to score."""


def require_finite(values: np.ndarray) -> np.ndarray:
    """`values`, or `NonFiniteSamples`: FID's matrix square root on NaN features crashes LAPACK
    (a segfault, not an exception), so they must never reach it."""
    bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
    if bad:
        raise NonFiniteSamples(f"{bad} of {len(values)} samples are not finite: the generator diverged")
    return values


class Evaluator:
    """Scores generators against one shard set; see the module docstring."""

    def __init__(self, urls: str | list[str], opts: EvalConfig, device: str = "cpu", progress: bool = True):
        self.shards = resolve(urls)
        self.opts, self.device, self.progress = opts, device, progress
        manifest = self.shards.manifest or {}
        self.kind = self.shards.kind or "image"
        self.source = manifest.get("source", "")
        self.data_sha256 = data_identity(self.shards)
        if self.kind == "points":
            self._init_points(manifest)
        else:
            self.net = features.load(
                feature_spec(opts, manifest), opts.inception_weights, opts.inception_sha256
            ).to(device)
            self.real = self._real_features()

    # --- the real side ---------------------------------------------------------------------

    def _init_points(self, manifest: dict) -> None:
        if self.source not in MIXTURES:
            raise ValueError(
                f"2-D shards from source {self.source!r} have no known modes; evaluation scores "
                f"the mixtures {', '.join(MIXTURES)} (make_shards source=ring8|grid25)"
            )
        modes_fn, self.sigma = MIXTURES[self.source]
        self.modes = modes_fn()
        draw = mixture_source(self.source, 2 * self.opts.num, seed=10_000 + self.opts.seed)
        fresh = np.stack([draw.load(i) for i in range(len(draw))])
        self.fresh, self.fresh_twin = fresh[: self.opts.num], fresh[self.opts.num :]

    def _real_images(self, num: int) -> Iterator[torch.Tensor]:
        cfg = StreamConfig(
            self.shards.urls, self.opts.batch_size, num_workers=0, shuffle=False,
            infinite=False, drop_last=False, verify=False,
        )  # fmt: skip
        seen = 0
        for batch in ShardLoader(cfg, self.shards):
            x = batch["x"][: num - seen]
            seen += len(x)
            yield x
            if seen >= num:
                return

    def _cache_path(self) -> Path | None:
        if not self.data_sha256 or self.shards.manifest is None:
            return None
        root = (
            Path(self.opts.cache_dir).expanduser() if self.opts.cache_dir else features.cache_root() / "real"
        )
        key = hashlib.sha256(f"{self.data_sha256}|{self.net.name}|{self.opts.num}".encode()).hexdigest()[:20]
        return root / f"{key}.npz"

    def _real_features(self) -> np.ndarray:
        path = self._cache_path()
        if path is not None and path.is_file():
            with np.load(path) as data:
                return data["features"]
        if path is None:
            log.warning("the shards have no manifest: real-data features are not cached")
        total = min(self.opts.num, (self.shards.manifest or {}).get("num_samples", self.opts.num))
        feats = self._features(self._real_images(self.opts.num), total, "real features")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            meta = {"data_sha256": self.data_sha256, "features": self.net.name, "num": len(feats)}
            np.savez(tmp, features=feats, meta=json.dumps(meta))
            tmp.replace(path)
        return feats

    @torch.no_grad()
    def _features(self, batches: Iterator[torch.Tensor], total: int, desc: str) -> np.ndarray:
        out = []
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress, leave=False) as bar:
            for x in batches:
                out.append(self.net(x.to(self.device)).float().cpu().numpy())
                bar.update(len(x))
        return np.concatenate(out)

    # --- scoring ---------------------------------------------------------------------------

    def info(self, num_fake: int, seed: int | None = None) -> dict[str, str]:
        """What a score of `num_fake` samples drawn with `seed` (default `eval.seed`) was measured
        with, and its comparability key."""
        name = "points" if self.kind == "points" else self.net.name
        num_real = len(self.fresh) if self.kind == "points" else len(self.real)
        info = {
            "features": name,
            "data_sha256": self.data_sha256,
            "num_real": str(num_real),
            "num_fake": str(num_fake),
            "seed": str(self.opts.seed if seed is None else seed),
        }
        return {**info, "key": evaluation_key(info)}

    def __call__(self, G: Generator, latent_dim: int, num: int = 0, seed: int | None = None) -> Result:
        """Score `G` on `num` samples (default `eval.num`) drawn with `seed` (default `eval.seed`)."""
        num = num or self.opts.num
        seed = self.opts.seed if seed is None else seed
        batches = generate(G, latent_dim, num, self.opts.batch_size, seed, self.device)
        if self.kind == "points":
            pts = require_finite(torch.cat(list(batches)).cpu().numpy())
            return Result(
                metrics.point_metrics(pts, self.modes, self.sigma, self.fresh), self.info(num, seed)
            )
        fake = require_finite(self._features(batches, num, "generated features"))
        out = metrics.image_metrics(self.real, fake, self.opts.nearest_k, seed, self.opts.kid_subsets)
        if self.source == STACKED:
            m = self.opts.mode_samples
            out |= self._stacked(generate(G, latent_dim, m, self.opts.batch_size, seed + 1, self.device), m)
        return Result(out, self.info(num, seed))

    def _stacked(self, batches: Iterator[torch.Tensor], total: int) -> dict[str, float]:
        labels = []
        with tqdm(total=total, desc="mode labels", unit="img", disable=not self.progress, leave=False) as bar:
            for x in batches:
                labels.append(self.net.labels(x).cpu().numpy())
                bar.update(len(x))
        return metrics.stacked_modes(np.concatenate(labels))

    def data_row(self) -> Result:
        """The real data scored as a generator would be: the ceiling for every table."""
        if self.kind == "points":
            out = metrics.point_metrics(self.fresh_twin, self.modes, self.sigma, self.fresh)
            return Result(out, self.info(len(self.fresh_twin)))
        half = len(self.real) // 2
        k = self.opts
        out = metrics.image_metrics(self.real[:half], self.real[half:], k.nearest_k, k.seed, k.kid_subsets)
        if self.source == STACKED:
            labels = [
                self.net.labels(x.to(self.device)).cpu().numpy()
                for x in self._real_images(self.opts.mode_samples)
            ]
            out |= metrics.stacked_modes(np.concatenate(labels))
        info = {**self.info(half), "num_real": str(half)}
        return Result(out, {**info, "key": evaluation_key(info), "note": "real half vs real half"})
