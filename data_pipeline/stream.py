"""Stream WebDataset shards into training batches on every rank, exactly once per epoch.

What comes from webdataset and what is ours (docs/ARCHITECTURE.md, "Data"):
- webdataset: opening URLs (`gopen`: files, `pipe:` commands, and `s3://` through our opener
  in data_pipeline/objstore.py), grouping tar members into samples (`group_by_keys`), the
  pipeline (`wds.DataPipeline`), decoding (`wds.decode` with handlers: the user's first, then
  our PNG fast path, then PIL), and the tarfile-based iterator for any tar our reader does not
  take (compression, PAX or GNU records).
- ours: which shards each reader reads (exactly once per epoch over ranks x loader workers),
  the seeded in-shard shuffle with a bounded buffer, the resumable position, skip-and-count of
  bad data, flips, batching, and a plain-ustar header reader, kept because it is faster end to
  end than tarfile's on 64-px images (benchmarks/RESULTS.md; `data.tar_reader=webdataset` opts out).

Readers: each rank runs `num_workers` DataLoader processes; reader slot = rank * num_workers +
worker id, and `total = world_size * num_workers` slots share the shards. In epoch `e` the shard
list is permuted with seed (seed, e), and slot s reads shards `perm[s::total]`: every sample is
read once per epoch over the whole job. That needs at least `total` shards; with fewer, pass
`resample=True`, where each slot draws shards with replacement from a seeded stream instead.

Samples stream one at a time from an open shard; a reader holds at most `shuffle_buffer` of
them, whatever the shard's size. The in-shard order is a seeded buffer shuffle (seed, epoch,
slot, shard), so a reader's position is just (epoch, shard index, samples taken from that
shard): `ShardLoader.state_dict()` records it for every slot, and a restart re-reads only the
one partly consumed shard, skipping (not decoding) the samples already taken.

Bad data never kills a loader worker: unreadable or truncated shards, undecodable images and
samples of the wrong shape are skipped and counted (`ShardLoader.skipped`), and so are samples
a user stage drops. A reader that gets through a whole pass of its shards without one good
sample raises instead of spinning forever.
"""

from __future__ import annotations

import functools
import importlib
import io
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander, tar_file_iterator

from data_pipeline import png
from data_pipeline.shards import ShardList, ShardSpecError, resolve, verify
from trainer.config.schema import DataConfig

Position = tuple[int, int, int]  # (epoch, shard index within the slot's list, sample index)
SKIP_REASONS = ("unreadable_shard", "decode_error", "bad_shape", "missing_field", "filtered")


_DATA = DataConfig()  # the data section's defaults (the schema layer: no torch, no services)


@dataclass
class StreamConfig:
    """How one rank streams a shard set. What the data section also sets defaults to its value
    there (`trainer.config.DataConfig`): one source for both."""

    urls: str | list[str]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    # DataLoader worker processes per rank (0 = read in the main process)
    num_workers: int = _DATA.loader_workers
    seed: int = 0
    shuffle: bool = _DATA.shuffle
    infinite: bool = True  # step-based training: start the next epoch when one ends
    resample: bool = _DATA.resample  # draw shards with replacement (any shard count; not exactly-once)
    hflip: bool = _DATA.hflip  # random horizontal flips (images only), done in the loader workers
    verify: bool = _DATA.verify  # check sha256 against the manifest before reading
    drop_last: bool = True  # full batches only (the trainer wants equal steps on every rank)
    expected_shape: tuple[int, ...] | None = None  # (C,H,W) or (2,); default: the manifest's
    with_keys: bool = False  # each batch also carries (epoch, sample key) per sample, for audits
    # Samples (points: records) held to shuffle within a shard: the memory bound of a reader.
    shuffle_buffer: int = _DATA.shuffle_buffer
    # Extra webdataset decode handlers `f(".ext", bytes) -> value | None`, tried before ours,
    # and maps over decoded samples (dicts; None drops one): callables or 'module:function'.
    decoders: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    # "fast": our plain-ustar reader; "webdataset": its tarfile iterator
    tar_reader: str = _DATA.tar_reader
    max_pixels: int = _DATA.max_pixels  # a larger image is skipped (counted as too_large) undecoded


_META = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar iterator skips
_ZERO_BLOCK = bytes(512)
TAR_READERS = ("fast", "webdataset")


def _fast_png(key: str, data: bytes, max_pixels: int = png.MAX_PIXELS) -> np.ndarray | None:
    """webdataset decode handler: our PNGs (filter 0 rows) in one inflate; None hands on."""
    return png._fast(data, max_pixels) if key.lower() == ".png" else None


def _pil_image(key: str, data: bytes, max_pixels: int = png.MAX_PIXELS) -> np.ndarray | None:
    """webdataset decode handler: any other image through PIL, as uint8 (C, H, W)."""
    return png.decode_pil(data, max_pixels) if key.lower() in IMAGE_KEYS_DOTTED else None


IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
IMAGE_KEYS_DOTTED = tuple("." + k for k in IMAGE_KEYS)


def load_callable(spec: Any) -> Callable:
    """A stage or decoder given as a callable, or as 'package.module:name' (from the config)."""
    if callable(spec):
        return spec
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ShardSpecError(f"data stage {spec!r}: write it as 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ShardSpecError(f"data stage {spec!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ShardSpecError(f"data stage {spec!r} is not callable")
    return fn


class _Prepended(io.RawIOBase):
    """A read-only stream that first returns `head`, then the rest of `stream`."""

    def __init__(self, head: bytes, stream: Any):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)


def _header_fields(header: bytes) -> tuple[bytes, int] | None:
    """(type flag, size) of a plain ustar/v7 member header with a valid checksum; None when the
    header needs more (PAX or GNU records, base-256 sizes, not a tar header at all)."""
    kind = header[156:157]
    if kind in (b"x", b"g", b"L", b"K") or header[124] & 0x80:
        return None
    try:
        checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    return (kind, size) if checksum == sum(header) - sum(header[148:156]) + 256 else None


def fast_tar_files(stream: Any, url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """A tar's regular members as webdataset's tar iterator yields them ({fname, data, __url__}),
    reading plain ustar headers directly (Python's tarfile builds an object per member, which
    dominates on small images). At the first header that needs more (compression, PAX or GNU
    records), the rest of the stream goes to webdataset's iterator."""
    read = 0
    while True:
        header = stream.read(512)
        if header == _ZERO_BLOCK or not header and not read:
            return  # end of archive (an empty file has no members, as tarfile sees it)
        if not header:  # a tar ends with zero blocks: the file was cut at a member boundary
            raise tarfile.ReadError(f"unexpected end of data after {read} members (truncated)")
        read += 1
        fields = _header_fields(header) if len(header) == 512 else None
        if fields is None:
            rest = _Prepended(header, stream)
            for f in tar_file_iterator(io.BufferedReader(rest), handler=on_error):
                yield {**f, "__url__": url}
            return
        kind, size = fields
        data = stream.read((size + 511) // 512 * 512)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data: a member of {size} bytes is truncated")
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        fname = name.decode("utf-8", "surrogateescape")
        if kind in (b"0", b"\0") and not _META.match(fname):
            yield {"fname": fname, "data": data[:size], "__url__": url}


def shard_samples(url: str, on_error: Callable[[Exception], bool], reader: str = "fast") -> Iterator[dict]:
    """One shard's samples as they stream in: webdataset's gopen and key grouping over our plain
    tar reader (`reader="fast"`) or webdataset's tar expander (`"webdataset"`).

    Nothing holds more than the sample being read. The stream is closed when its last sample
    has been taken (a `pipe:` command's failure surfaces there and goes to `on_error`).
    """
    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any opener failure is skipped and counted
        on_error(exc)
        return
    try:
        if reader == "fast":
            files = _guarded(fast_tar_files(stream, url, on_error), on_error)
        else:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=on_error, eof_value=None)
        yield from group_by_keys(files, handler=on_error)
    finally:
        try:
            stream.close()
        except Exception as exc:  # noqa: BLE001 - as above
            on_error(exc)


def _guarded(files: Iterator[dict], on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """Members until the first read error, which goes to `on_error` (the members before it are kept)."""
    try:
        yield from files
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt shard is skipped and counted
        on_error(exc)


def buffered_shuffle(units: Iterator, rng: np.random.Generator | None, size: int) -> Iterator:
    """Units in a seeded random order using a buffer of at most `size` (no shuffle for None).

    The order depends only on the input sequence and the generator's seed, so replaying a shard
    with the same seed reproduces it: a resume needs only the count of units already taken.
    """
    if rng is None or size <= 1:
        yield from units
        return
    buf: list = []
    for unit in units:
        if len(buf) < size:
            buf.append(unit)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], unit = unit, buf[i]
        yield unit
    for i in rng.permutation(len(buf)):
        yield buf[i]


class ShardStream(IterableDataset):
    """The per-process reader: yields batches with the position reached after each one.

    A webdataset pipeline per reader slot: our source stage (which shards, in which order, from
    which position; each shard streamed through webdataset's tar iterator and shuffled in a
    bounded buffer), webdataset's decoder (our PNG fast path, then PIL), the user's stages, and
    our batcher (shape checks, flips, the position and skip counts each batch carries).
    """

    def __init__(
        self, shards: ShardList, cfg: StreamConfig, start: dict[int, Position] | None = None, rotate: int = 0
    ):
        super().__init__()
        self.rotate = rotate  # worker w reads slot (w + rotate) % num_workers: see ShardLoader
        self.urls = shards.urls
        self.cfg = cfg
        self.kind = shards.kind or ("points" if cfg.expected_shape == (2,) else "image")
        self.expected_shape = tuple(cfg.expected_shape or shards.sample_shape or ()) or None
        self.start = dict(start or {})
        self.decoders = [load_callable(d) for d in cfg.decoders]
        self.stages = [load_callable(f) for f in cfg.stages]

    def slot_info(self) -> tuple[int, int]:
        """(this process's reader slot, total slots over the job)."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.cfg.rank * nw + (wid + self.rotate) % nw, self.cfg.world_size * nw

    def shards_for(self, epoch: int, slot: int, total: int) -> list[int]:
        """Indices of the shards that `slot` reads in `epoch`, in reading order."""
        n = len(self.urls)
        if self.cfg.resample:
            rng = np.random.default_rng([self.cfg.seed, epoch, slot, 7])
            return rng.integers(n, size=max(1, n // total)).tolist()
        perm = (
            np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle else np.arange(n)
        )
        return perm[slot::total].tolist()

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, *key])

    def _on_error(self, skipped: Counter, url: str) -> Callable[[Exception], bool]:
        seen: list[Exception] = []  # one shard counts once, however many stages see its fault

        def handler(exc: Exception) -> bool:
            if not seen:
                skipped["unreadable_shard"] += 1
                warnings.warn(f"shard {url}: {exc!r}; the samples read before it are kept", stacklevel=1)
            seen.append(exc)
            return True

        return handler

    def _source(self, slot: int, total: int, skipped: Counter) -> Iterator[dict]:
        """Our first stage: every shard this slot reads, epoch after epoch, from the saved
        position on; each sample (images) or record slice (points) tagged with `__pos__`, the
        position after it, and an `{"__epoch_end__": e}` marker closing each pass."""
        epoch, shard_i, skip = self.start.get(slot, (0, 0, 0))
        while True:
            order = self.shards_for(epoch, slot, total)
            for i in range(shard_i, len(order)):
                url = self.urls[order[i]]
                units = shard_samples(url, self._on_error(skipped, url), self.cfg.tar_reader)
                tagged = self._points(units, epoch, slot, i, skipped) if self.kind == "points" else units
                rng = self._rng(epoch, slot, i) if self.cfg.shuffle else None
                shuffled = buffered_shuffle(tagged, rng, self.cfg.shuffle_buffer)
                yield from self._positions(shuffled, epoch, slot, i, skip if i == shard_i else 0)
            yield {"__epoch_end__": epoch}
            epoch, shard_i, skip = epoch + 1, 0, 0
            if not self.cfg.infinite:
                return

    def _positions(
        self, units: Iterator[dict], epoch: int, slot: int, shard_i: int, skip: int
    ) -> Iterator[dict]:
        """Units with the position after each; the first `skip` samples (points) dropped unread."""
        flips = self._rng(epoch, slot, shard_i, 1)
        done = 0
        for unit in units:
            n = len(unit["pts"]) if self.kind == "points" else 1
            flip = bool(flips.random() < 0.5)  # drawn for every unit, so a resume draws the same
            if done + n <= skip:
                done += n
                continue
            if done < skip:  # a points record the saved position cuts
                unit = {**unit, "pts": unit["pts"][skip - done :], "cls": unit["cls"][skip - done :]}
                unit["names"] = unit["names"][skip - done :]
                done = skip
            done += len(unit["pts"]) if self.kind == "points" else 1
            unit["__pos__"] = (epoch, shard_i, done)
            unit["__flip__"] = flip
            yield unit

    def _points(
        self, samples: Iterator[dict], epoch: int, slot: int, shard_i: int, skipped: Counter
    ) -> Iterator[dict]:
        """Point records (`pts.npy`, `cls.npy`) as arrays in a seeded order within each record.

        Points stay in slices of their records, not one by one: the same exactly-once order and
        positions as a per-point reader for a fraction of the CPU."""
        for r, s in enumerate(samples):
            if "pts.npy" not in s:
                skipped["missing_field"] += 1
                continue
            try:
                pts = np.load(io.BytesIO(s["pts.npy"]), allow_pickle=False)
                cls = np.load(io.BytesIO(s["cls.npy"]), allow_pickle=False) if "cls.npy" in s else None
            except ValueError:
                skipped["decode_error"] += 1
                continue
            if pts.ndim != 2 or pts.shape[1] != 2 or (self.expected_shape not in (None, (2,))):
                skipped["bad_shape"] += len(pts) if pts.ndim == 2 else 1
                continue
            perm = (
                self._rng(epoch, slot, shard_i, 2, r).permutation(len(pts))
                if self.cfg.shuffle
                else slice(None)
            )
            cls = np.full(len(pts), -1, np.int64) if cls is None else cls.astype(np.int64)
            names = [f"{s['__key__']}/{i}" for i in np.arange(len(pts))[perm]] if self.cfg.with_keys else None
            yield {"pts": pts.astype(np.float32)[perm], "cls": cls[perm], "names": names or []}

    def _user_stage(self, f: Callable, skipped: Counter) -> Callable:
        """A user's map over decoded samples; markers pass by it, None drops the sample."""

        def stage(samples: Iterator[dict]) -> Iterator[dict]:
            for s in samples:
                out = s if "__epoch_end__" in s else f(s)
                if out is None:
                    skipped["filtered"] += 1
                    continue
                if "__pos__" in s:
                    out.setdefault("__pos__", s["__pos__"])
                    out.setdefault("__flip__", s["__flip__"])
                yield out

        return stage

    def pipeline(self, slot: int, total: int, skipped: Counter) -> wds.DataPipeline:
        """The webdataset pipeline of one reader slot (images: our stages around webdataset's)."""
        if self.kind == "points":
            return wds.DataPipeline(functools.partial(self._source, slot, total, skipped))

        def on_decode_error(exc: Exception) -> bool:  # webdataset wraps the handler's exception
            too_large = isinstance(exc, png.ImageTooLarge) or isinstance(exc.__cause__, png.ImageTooLarge)
            skipped["too_large" if too_large else "decode_error"] += 1
            return True

        limit = self.cfg.max_pixels
        ours = (
            functools.partial(_fast_png, max_pixels=limit),
            functools.partial(_pil_image, max_pixels=limit),
        )
        return wds.DataPipeline(
            functools.partial(self._source, slot, total, skipped),
            wds.decode(*self.decoders, *ours, handler=on_decode_error),
            *[self._user_stage(f, skipped) for f in self.stages],
        )

    def __iter__(self) -> Iterator[dict]:
        slot, total = self.slot_info()
        skipped: Counter = Counter()
        batches = self._point_batches if self.kind == "points" else self._image_batches
        yield from batches(iter(self.pipeline(slot, total, skipped)), slot, total, skipped)

    def _no_sample(self, slot: int, total: int, skipped: Counter) -> ShardSpecError:
        return ShardSpecError(
            f"reader slot {slot}/{total} found no valid sample in a whole pass over its shards "
            f"{[self.urls[k] for k in self.shards_for(0, slot, total)][:4]} (skipped: {dict(skipped)}); "
            "check the shards and that their sample shape matches the model"
        )

    def _pass_ended(
        self, epoch: int, good: int, xs: list, ys: list, keys: list, slot: int, total: int, skipped: Counter
    ) -> list[dict] | None:
        """At the end of a pass over this slot's shards: an error if it held no good sample;
        None to go on (step-based training); else the last batches before the stream stops."""
        if good == 0:
            raise self._no_sample(slot, total, skipped)
        if self.cfg.infinite:
            return None
        end = (epoch + 1, 0, 0)
        if xs and not self.cfg.drop_last:
            return [self._batch(xs, ys, slot, end, skipped, keys)]
        return [self._batch([], [], slot, end, skipped)] if skipped else []

    def _image_batches(
        self, samples: Iterator[dict], slot: int, total: int, skipped: Counter
    ) -> Iterator[dict]:
        """Our last stage: decoded samples -> batches carrying the position after their last sample."""
        xs, ys, keys, good, pos = [], [], [], 0, None
        for s in samples:
            if "__epoch_end__" in s:
                last = self._pass_ended(s["__epoch_end__"], good, xs, ys, keys, slot, total, skipped)
                if last is None:
                    good = 0
                    continue
                yield from last
                return
            x = next((s[k] for k in IMAGE_KEYS if k in s), None)
            if x is None:
                skipped["missing_field"] += 1
                continue
            if self.expected_shape is not None and tuple(x.shape) != self.expected_shape:
                skipped["bad_shape"] += 1
                continue
            xs.append(x[..., ::-1] if self.cfg.hflip and s["__flip__"] else x)
            ys.append(int(s["cls"]) if "cls" in s else -1)
            if self.cfg.with_keys:
                keys.append((s["__pos__"][0], s["__key__"]))
            good += 1
            pos = s["__pos__"]
            if len(xs) == self.cfg.batch_size:
                yield self._batch(xs, ys, slot, pos, skipped, keys)
                xs, ys, keys = [], [], []
                skipped.clear()

    def _point_batches(
        self, records: Iterator[dict], slot: int, total: int, skipped: Counter
    ) -> Iterator[dict]:
        """Point slices -> batches of `batch_size` points, cut across record boundaries."""
        xs, ys, keys, filled, good = [], [], [], 0, 0
        for rec in records:
            if "__epoch_end__" in rec:
                last = self._pass_ended(rec["__epoch_end__"], good, xs, ys, keys, slot, total, skipped)
                if last is None:
                    good = 0
                    continue
                yield from last
                return
            epoch, shard_i, after = rec["__pos__"]
            n, j = len(rec["pts"]), 0
            good += n
            while j < n:
                take = min(n - j, self.cfg.batch_size - filled)
                xs.append(rec["pts"][j : j + take])
                ys.append(rec["cls"][j : j + take])
                if self.cfg.with_keys:
                    keys.extend((epoch, name) for name in rec["names"][j : j + take])
                filled, j = filled + take, j + take
                if filled == self.cfg.batch_size:
                    yield self._batch(xs, ys, slot, (epoch, shard_i, after - n + j), skipped, keys)
                    xs, ys, keys, filled = [], [], [], 0
                    skipped.clear()

    def _to_tensor(self, xs: list[np.ndarray]) -> torch.Tensor:
        if self.kind == "points":  # xs holds (k, 2) slices of records
            return torch.from_numpy(np.concatenate(xs))
        return torch.from_numpy(np.stack(xs)).float().div_(127.5).sub_(1.0)

    def _batch(
        self, xs: list, ys: list, slot: int, pos: Position, skipped: Counter, keys: list | None = None
    ) -> dict:
        if self.kind == "points":
            y = torch.from_numpy(np.concatenate(ys)) if ys else torch.zeros(0, dtype=torch.long)
        else:
            y = torch.tensor(ys, dtype=torch.long)
        batch = {
            "x": self._to_tensor(xs) if xs else torch.empty(0),
            "y": y,
            "slot": slot,
            "pos": pos,
            "skipped": dict(skipped),
        }
        if self.cfg.with_keys:
            batch["keys"] = list(keys or [])
        return batch


class ShardLoader:
    """What a trainer iterates: batches of `x` in [-1, 1] (and labels), with resumable position."""

    def __init__(self, cfg: StreamConfig, shards: ShardList | None = None):
        self.cfg = cfg
        self.shards = shards or resolve(cfg.urls)
        slots = cfg.world_size * max(1, cfg.num_workers)
        if not cfg.resample and len(self.shards.urls) < slots:
            raise ShardSpecError(
                f"{len(self.shards.urls)} shard(s) cannot be split over {cfg.world_size} rank(s) x "
                f"{max(1, cfg.num_workers)} loader worker(s) = {slots} readers without repeating data: "
                "write more, smaller shards (make_shards shard_size=...), lower data.loader_workers, "
                "or set data.resample=true"
            )
        if cfg.verify:
            verify(self.shards)
        self.positions: dict[int, Position] = {}
        self.skipped: Counter = Counter()
        self.samples_seen = 0
        # DataLoader takes batches from its workers strictly in turn, starting with worker 0.
        # To replay the same interleaving after a restart, the reader that was due next is
        # handed to worker 0 (in step-based, infinite mode no reader ever runs dry).
        self.next_reader = 0

    def __iter__(self) -> Iterator[dict]:
        readers = max(1, self.cfg.num_workers)
        dataset = ShardStream(self.shards, self.cfg, self.positions, rotate=self.next_reader)
        loader = DataLoader(
            dataset,
            batch_size=None,  # batches are built in the workers
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.cfg.num_workers else None,
        )
        for batch in loader:
            # Only consumed batches move the position: prefetched ones are re-read on resume.
            self.positions[batch["slot"]] = tuple(batch["pos"])
            self.next_reader = (batch["slot"] - self.cfg.rank * readers + 1) % readers
            self.skipped.update(batch["skipped"])
            if batch["x"].numel():
                self.samples_seen += len(batch["x"])
                yield batch

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far (shards that failed to read are counted separately)."""
        return sum(v for k, v in self.skipped.items() if k != "unreadable_shard")

    def state_dict(self) -> dict:
        """What a checkpoint must save to resume this rank's stream where it stopped."""
        return {
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "readers": self.cfg.world_size * max(1, self.cfg.num_workers),
            "skipped": dict(self.skipped),
            "samples_seen": self.samples_seen,
            "next_reader": self.next_reader,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()` output; the reader layout and seed must be unchanged."""
        readers = self.cfg.world_size * max(1, self.cfg.num_workers)
        if state["readers"] != readers or state["seed"] != self.cfg.seed:
            raise ValueError(
                f"data position was saved with {state['readers']} readers and seed {state['seed']}, "
                f"now {readers} readers and seed {self.cfg.seed}: keep trainer.num_workers, "
                "data.loader_workers and trainer.seed when resuming"
            )
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.skipped = Counter(state["skipped"])
        self.samples_seen = state["samples_seen"]
        self.next_reader = state["next_reader"]
