"""Write an image collection or a 2-D benchmark as WebDataset tar shards plus `manifest.json`.

    python -m data_pipeline.make_shards source=digits out=shards/digits resolution=32
    python -m data_pipeline.make_shards source=stacked_digits out=shards/stacked num_samples=50000
    python -m data_pipeline.make_shards source=folder src=~/faces data.urls=shards/faces \
        model.resolution=64 model.channels=3

Training's names for the same things work too (`data.urls` for `out`, `model.resolution`,
`model.channels`), so one set of keys can go to both commands.

Shards are byte-identical for the same inputs (seeded order, fixed tar metadata) and appear
only when complete: everything is written under a staging folder and renamed at the end, the
manifest last, so a crash never leaves a set of shards that looks finished.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data_pipeline import png, sources
from data_pipeline.shards import MANIFEST, sha256_file
from trainer.config.cli import parse_overrides

FORMAT = "stablegan-shards/1"
SOURCES = ("folder", "npz", "digits", "stacked_digits", "ring8", "grid25")
# Training's key for the same thing -> make_shards' own key.
TRAINING_KEYS = {"data.urls": "out", "model.resolution": "resolution", "model.channels": "channels"}


@dataclass
class MakeShardsConfig:
    """Options of `make_shards` (pass as key=value)."""

    source: str = "digits"
    out: str = "shards/digits"
    src: str = ""  # folder or .npz path for source=folder|npz
    name: str = ""  # shard file prefix; defaults to the source name
    resolution: int = 32
    channels: int = 0  # 1 or 3; 0 = the source's own: 3 for stacked_digits (RGB), else 1
    shard_size: int = 0  # samples per shard; 0 = 1000 images or 10000 points
    num_samples: int = 100_000  # ring8/grid25/stacked_digits only
    points_per_record: int = 1000  # ring8/grid25: points stored together in one tar member
    seed: int = 0  # draws ring8/grid25 points, stacked digits' triples and the write order
    shuffle: bool = True  # write in a seeded random order so every shard mixes classes
    fraction: float = 1.0  # keep this seeded share of the source (0.1: a small-data subset)
    key: str = ""  # npz: array name of the images (default: first uint8 (N,H,W[,C]) array)
    label_key: str = ""  # npz: array name of the labels (default: y, labels or y_train)


def validate(cfg: MakeShardsConfig) -> MakeShardsConfig:
    """`cfg` with `channels` resolved; bad options rejected before any work, naming the key and
    the fix."""
    cfg = replace(cfg, channels=cfg.channels or (3 if cfg.source == "stacked_digits" else 1))
    if cfg.source not in SOURCES:
        raise ValueError(f"source={cfg.source!r} is unknown; allowed: {', '.join(SOURCES)}")
    if cfg.source in ("folder", "npz") and not cfg.src:
        raise ValueError(f"source={cfg.source} needs src=PATH")
    if not 4 <= cfg.resolution <= 1024:
        raise ValueError(f"resolution={cfg.resolution} must be within 4..1024")
    if cfg.channels not in (1, 3):
        raise ValueError(f"channels={cfg.channels} must be 1 or 3")
    if not 0 < cfg.fraction <= 1:
        raise ValueError(f"fraction={cfg.fraction} must be in (0, 1]: the share of the source to keep")
    if cfg.shard_size < 0 or cfg.num_samples <= 0 or cfg.points_per_record <= 0:
        raise ValueError("shard_size must be >= 0; num_samples and points_per_record must be > 0")
    return cfg


def load_source(cfg: MakeShardsConfig) -> sources.Source:
    """The `Source` that `cfg.source` names."""
    if cfg.source == "folder":
        return sources.folder_source(cfg.src, cfg.resolution, cfg.channels)
    if cfg.source == "npz":
        return sources.npz_source(cfg.src, cfg.resolution, cfg.channels, cfg.key, cfg.label_key)
    if cfg.source == "digits":
        return sources.digits_source(cfg.resolution, cfg.channels)
    if cfg.source == "stacked_digits":
        if cfg.channels != 3:
            raise ValueError("source=stacked_digits stacks three digits as RGB: set channels=3")
        return sources.stacked_digits_source(cfg.num_samples, cfg.seed, cfg.resolution)
    return sources.mixture_source(cfg.source, cfg.num_samples, cfg.seed)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class _ShardSink:
    """Rolls tar files `name-000000.tar, ...` in a staging folder, `shard_size` samples each."""

    def __init__(self, staging: Path, name: str, shard_size: int) -> None:
        self.staging, self.name, self.shard_size = staging, name, shard_size
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def write(self, sample: dict, num_samples: int) -> None:
        if self._writer is None or self._count >= self.shard_size:
            self._roll()
        assert self._writer is not None
        # Fixed mtime/owner/mode give byte-identical tars; an int mtime avoids a PAX header per member.
        self._writer.write(sample)
        self._count += num_samples
        self.shards[-1]["num_samples"] += num_samples

    def _roll(self) -> None:
        self._close_current()
        fname = f"{self.name}-{len(self.shards):06d}.tar"
        stream = open(self.staging / fname, "wb")
        tar_writer = wds.TarWriter(
            stream, encoder=False, mtime=0, user="stablegan", group="stablegan", mode=0o444
        )
        self._writer = tar_writer
        self._stream = stream
        self._count = 0
        self.shards.append({"name": fname, "num_samples": 0})

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = None

    def close(self) -> list[dict]:
        self._close_current()
        for shard in self.shards:
            path = self.staging / shard["name"]
            shard["bytes"] = path.stat().st_size
            shard["sha256"] = sha256_file(path)
        return self.shards


def write_shards(cfg: MakeShardsConfig, progress: bool = True) -> dict:
    """Write the shards and the manifest that `cfg` describes; return the manifest."""
    cfg = validate(cfg)
    source = load_source(cfg)
    name = cfg.name or cfg.source
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    points = source.kind == "points"
    shard_size = cfg.shard_size or (10_000 if points else 1000)
    if points and shard_size % cfg.points_per_record:
        raise ValueError(
            f"shard_size={shard_size} must be a multiple of points_per_record={cfg.points_per_record}"
        )
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    sink = _ShardSink(staging, name, shard_size)
    try:
        with Progress(len(source), f"make_shards {name}", progress) as bar:
            write = _write_points if points else _write_images
            written, skipped, sample_shape = write(cfg, source, _order(cfg, len(source)), sink, bar)
        if written == 0:
            raise ValueError(
                f"no readable samples in src={cfg.src!r} ({skipped} unreadable files); "
                "check the folder holds valid images"
            )
        manifest = {
            "format": FORMAT,
            "name": name,
            "source": cfg.source,
            "kind": source.kind,
            "params": {**asdict(cfg), **source.params},
            "num_samples": written,
            "skipped": skipped,
            "sample_shape": sample_shape,
            "dtype": "float32" if points else "uint8",
            "classes": source.classes,
            "shards": sink.close(),
        }
        _publish(staging, out, name, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _order(cfg: MakeShardsConfig, n: int) -> np.ndarray:
    """The write order: seeded and shuffled (or as is), then the seeded `fraction` subset."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n) if cfg.shuffle else np.arange(n)
    if cfg.fraction < 1:  # a seeded subset, in the order asked for
        keep = rng.permutation(n)[: max(1, round(n * cfg.fraction))]
        order = order[np.isin(order, keep)]
    return order


def _write_points(cfg: MakeShardsConfig, source: sources.Source, order: np.ndarray, sink, bar) -> tuple:
    """Points in records of `points_per_record`; returns (written, skipped, sample shape)."""
    written, step = 0, cfg.points_per_record
    for start in range(0, len(order), step):
        idx = order[start : start + step]
        pts = np.stack([source.load(int(i)) for i in idx]).astype(np.float32)
        sample = {"__key__": f"{start:09d}", "pts.npy": _npy_bytes(pts)}
        if source.labels is not None:
            sample["cls.npy"] = _npy_bytes(source.labels[idx])
        sink.write(sample, len(idx))
        written += len(idx)
        bar.update(len(idx))
    return written, 0, [2]


def _write_images(cfg: MakeShardsConfig, source: sources.Source, order: np.ndarray, sink, bar) -> tuple:
    """One PNG per sample; unreadable files skipped and counted. Returns (written, skipped,
    sample shape)."""
    written = skipped = 0
    sample_shape: list[int] | None = None
    for pos, (i, arr) in enumerate(sources.iter_records(source, order)):
        bar.update(1)
        if arr is None:
            skipped += 1
            continue
        shape = [1, *arr.shape] if arr.ndim == 2 else [arr.shape[2], *arr.shape[:2]]
        sample_shape = sample_shape or shape
        sample = {"__key__": f"{pos:09d}", "png": png.encode(arr)}
        if source.labels is not None:
            sample["cls"] = str(int(source.labels[i])).encode()
        sink.write(sample, 1)
        written += 1
    return written, skipped, sample_shape


class Progress:
    """A live bar on a terminal; off one (a log, a pipe), a line at every tenth of the work,
    as training prints a line per interval rather than carriage-return updates."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.done, self.next_line = total, desc, 0, 0
        self.live = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.live
        self.bar = tqdm(total=total, desc=desc, unit="sample", disable=not self.live)
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.lines and (self.done >= self.next_line or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(
                f"{self.desc}: {self.done}/{self.total} samples ({rate:.0f}/s)", file=sys.stderr, flush=True
            )
            self.next_line = self.done + max(1, self.total // 10)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _publish(staging: Path, out: Path, name: str, manifest: dict) -> None:
    """Move finished shards into `out` and write the manifest last, atomically."""
    # A stale manifest would describe shards that are about to change: drop it first.
    (out / MANIFEST).unlink(missing_ok=True)
    keep = {s["name"] for s in manifest["shards"]}
    for old in out.glob(f"{name}-*.tar"):
        if old.name not in keep:
            old.unlink()
    for shard in manifest["shards"]:
        os.replace(staging / shard["name"], out / shard["name"])
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("keys:", ", ".join(MakeShardsConfig.__dataclass_fields__))
        print("also, as training names them:", ", ".join(f"{k} (= {v})" for k, v in TRAINING_KEYS.items()))
        return 0
    try:
        cfg = parse_overrides(MakeShardsConfig, argv, TRAINING_KEYS)
        manifest = write_shards(cfg)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.out).expanduser()
    print(
        f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {out} "
        f"(skipped {manifest['skipped']}); manifest: {out / MANIFEST}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
