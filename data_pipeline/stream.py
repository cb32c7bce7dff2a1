"""Stream WebDataset shards into training batches on every rank, exactly once per epoch.

Readers: each rank runs `num_workers` DataLoader processes; reader slot = rank * num_workers +
worker id, and `total = world_size * num_workers` slots share the shards. In epoch `e` the shard
list is permuted with seed (seed, e), and slot s reads shards `perm[s::total]`: every sample is
read once per epoch over the whole job. That needs at least `total` shards; with fewer, pass
`resample=True`, where each slot draws shards with replacement from a seeded stream instead.

Shuffling is two-level and fully determined by (seed, epoch, slot, shard): the shard order
above, then a permutation of each shard's samples (a shuffle buffer the size of a shard;
`make_shards` already writes samples in a seeded random order). Because of that, a reader's
position is just (epoch, shard index, sample index): `ShardLoader.state_dict()` records it
for every slot and a restart skips straight to it, reading only the one partly consumed shard.

Bad data never kills a loader worker: unreadable or truncated shards, undecodable images and
samples of the wrong shape are skipped and counted (`ShardLoader.skipped`). A reader that gets
through a whole pass of its shards without one good sample raises instead of spinning forever.
"""

from __future__ import annotations

import io
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data_pipeline import png
from data_pipeline.shards import ShardList, ShardSpecError, resolve, verify

Position = tuple[int, int, int]  # (epoch, shard index within the slot's list, sample index)
SKIP_REASONS = ("unreadable_shard", "decode_error", "bad_shape", "missing_field")


@dataclass
class StreamConfig:
    """How one rank streams a shard set."""

    urls: str | list[str]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the main process)
    seed: int = 0
    shuffle: bool = True
    infinite: bool = True  # step-based training: start the next epoch when one ends
    resample: bool = False  # draw shards with replacement (any shard count; not exactly-once)
    hflip: bool = False  # random horizontal flips (images only), done in the loader workers
    verify: bool = True  # check sha256 against the manifest before reading
    drop_last: bool = True  # full batches only (the trainer wants equal steps on every rank)
    expected_shape: tuple[int, ...] | None = None  # (C,H,W) or (2,); default: the manifest's
    with_keys: bool = False  # each batch also carries (epoch, sample key) per sample, for audits


_META = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar_file_iterator skips
_ZERO_BLOCK = bytes(512)


def _plain_tar_members(data: bytes) -> tuple[list[tuple[str, bytes]], Exception | None] | None:
    """Regular-file members of an uncompressed ustar/v7 tar held in memory, and the error
    that cut it short; None when the archive needs more than that (compression, PAX or GNU
    long-name records, base-256 sizes), for `tarfile` to handle.

    Python's `tarfile` builds a header object per member, which dominates the stream's time
    for small images once PNG decoding is fast (benchmarks/RESULTS.md). Header checksums are
    verified.
    """
    members: list[tuple[str, bytes]] = []
    pos, end = 0, len(data)
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if header == _ZERO_BLOCK:
            return members, None  # end of archive
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K") or header[124] & 0x80:
            return None  # tarfile reads the whole archive again
        try:
            checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None if pos == 0 else (members, tarfile.ReadError(f"invalid tar header at byte {pos}"))
        if checksum != sum(header) - sum(header[148:156]) + 256:
            if pos == 0:
                return None  # not a plain tar (e.g. gzip): let tarfile decide
            return members, tarfile.ReadError(f"bad tar header checksum at byte {pos}")
        start = pos + 512
        if start + size > end:
            return members, tarfile.ReadError(f"unexpected end of data: member at byte {pos} is truncated")
        if kind in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                name = prefix + b"/" + name if prefix else name
            fname = name.decode("utf-8", "surrogateescape")
            if not _META.match(fname):
                members.append((fname, data[start : start + size]))
        pos = start + (size + 511) // 512 * 512
    if pos == 0 and end == 0:
        return members, None  # an empty file: no samples (as tarfile sees it)
    # A tar ends with zero blocks: their absence means the file was cut at a member boundary.
    return members, tarfile.ReadError(f"unexpected end of data after {len(members)} members (truncated)")


def _read_shard(url: str) -> tuple[list[dict], Exception | None]:
    """All samples of one tar, and the exception that cut it short, if any.

    Members are collected first and grouped afterwards, so every complete member read before
    a truncation or read error is kept.
    """
    members: list[tuple[str, bytes]] = []
    data, error = b"", None
    try:
        stream = gopen(url, "rb")
        try:
            data = stream.read()  # shards are read whole anyway (a shuffle permutes each one)
        finally:
            stream.close()  # a pipe: URL raises here when its command failed
    except Exception as exc:  # noqa: BLE001 - any reader failure is skipped and counted
        error = exc
    plain = _plain_tar_members(data)
    if plain is not None:
        members, parse_error = plain
        error = error or parse_error
    else:
        try:
            members.extend((f["fname"], f["data"]) for f in tar_file_iterator(io.BytesIO(data)))
        except Exception as exc:  # noqa: BLE001 - as above
            error = error or exc
    samples: dict[str, dict] = {}
    for fname, content in members:
        key, ext = base_plus_ext(fname)
        if key is not None:
            samples.setdefault(key, {"__key__": key})[ext.lower()] = content
    return list(samples.values()), error


class ShardStream(IterableDataset):
    """The per-process reader: yields batches with the position reached after each one."""

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

    def _items(self, samples: list[dict], skipped: Counter) -> list:
        """Split raw tar samples into training items: (raw image bytes, class, key)."""
        items: list = []
        for s in samples:
            raw = next((s[k] for k in ("png", "jpg", "jpeg", "webp") if k in s), None)
            if raw is None:
                skipped["missing_field"] += 1
                continue
            items.append((raw, int(s["cls"]) if "cls" in s else -1, s["__key__"]))
        return items

    def _points(self, samples: list[dict], skipped: Counter) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """A shard's 2-D points as arrays: points (N, 2) float32, classes (N,), keys (or [])."""
        pts_list, cls_list, keys = [], [], []
        for s in samples:
            if "pts.npy" not in s:
                skipped["missing_field"] += 1
                continue
            try:
                pts = np.load(io.BytesIO(s["pts.npy"]), allow_pickle=False)
            except ValueError:
                skipped["decode_error"] += 1
                continue
            if pts.ndim != 2 or pts.shape[1] != 2:
                skipped["bad_shape"] += 1
                continue
            cls = np.load(io.BytesIO(s["cls.npy"]), allow_pickle=False) if "cls.npy" in s else None
            pts_list.append(pts.astype(np.float32))
            cls_list.append(np.full(len(pts), -1, np.int64) if cls is None else cls.astype(np.int64))
            if self.cfg.with_keys:
                keys.extend(f"{s['__key__']}/{i}" for i in range(len(pts)))
        if not pts_list:
            return np.zeros((0, 2), np.float32), np.zeros(0, np.int64), keys
        return np.concatenate(pts_list), np.concatenate(cls_list), keys

    def _decode(self, item, skipped: Counter) -> tuple[np.ndarray, int] | None:
        x, y, _ = item
        if self.kind == "image":
            try:
                x = png.decode(x)
            except (OSError, ValueError, SyntaxError):
                skipped["decode_error"] += 1
                return None
        if self.expected_shape is not None and tuple(x.shape) != self.expected_shape:
            skipped["bad_shape"] += 1
            return None
        return x, y

    def _order(self, n: int, epoch: int, slot: int, shard_i: int) -> np.ndarray:
        """The order a shard's n samples are read in: seeded by (seed, epoch, slot, shard)."""
        if not self.cfg.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.cfg.seed, epoch, slot, shard_i]).permutation(n)

    def _to_tensor(self, xs: list[np.ndarray]) -> torch.Tensor:
        if self.kind == "points":  # xs holds (k, 2) slices of shards
            return torch.from_numpy(np.concatenate(xs))
        return torch.from_numpy(np.stack(xs)).float().div_(127.5).sub_(1.0)

    def __iter__(self) -> Iterator[dict]:
        slot, total = self.slot_info()
        epoch, shard_i, sample_i = self.start.get(slot, (0, 0, 0))
        skipped: Counter = Counter()
        xs: list[np.ndarray] = []
        ys: list = []  # class ids (images) or slices of them (points)
        keys: list[tuple[int, str]] = []
        filled = 0  # points in xs (which holds slices for points)
        good_this_pass = 0
        while True:
            order = self.shards_for(epoch, slot, total)
            while shard_i < len(order):
                k = order[shard_i]
                samples, err = _read_shard(self.urls[k])
                if err is not None:
                    skipped["unreadable_shard"] += 1
                    warnings.warn(
                        f"shard {self.urls[k]}: {err!r}; kept {len(samples)} samples read before it",
                        stacklevel=1,
                    )
                if self.kind == "points":
                    # Points go in slices of the shard's arrays, not one by one: the same
                    # permutation, batches and positions as the per-sample path, for a
                    # fraction of the CPU (benchmarks/data_throughput.py --points).
                    pts, cls, names = self._points(samples, skipped)
                    perm = self._order(len(pts), epoch, slot, shard_i)
                    j = sample_i
                    if self.expected_shape is not None and self.expected_shape != (2,):
                        skipped["bad_shape"] += len(pts) - j
                        j = len(pts)
                    while j < len(pts):
                        take = perm[j : j + self.cfg.batch_size - filled]
                        xs.append(pts[take])
                        ys.append(cls[take])
                        if self.cfg.with_keys:
                            keys.extend((epoch, names[i]) for i in take)
                        filled += len(take)
                        good_this_pass += len(take)
                        j += len(take)
                        if filled == self.cfg.batch_size:
                            pos = (epoch, shard_i, j) if j < len(pts) else (epoch, shard_i + 1, 0)
                            yield self._batch(xs, ys, slot, pos, skipped, keys)
                            xs, ys, keys, skipped, filled = [], [], [], Counter(), 0
                    shard_i, sample_i = shard_i + 1, 0
                    continue
                items = self._items(samples, skipped)
                perm = self._order(len(items), epoch, slot, shard_i)
                flips = (
                    np.random.default_rng([self.cfg.seed, epoch, slot, shard_i, 1]).random(len(items)) < 0.5
                )
                for j in range(sample_i, len(items)):
                    decoded = self._decode(items[perm[j]], skipped)
                    if decoded is None:
                        continue
                    x, y = decoded
                    if self.cfg.hflip and self.kind == "image" and flips[j]:
                        x = x[..., ::-1]
                    xs.append(x)
                    ys.append(y)
                    if self.cfg.with_keys:
                        keys.append((epoch, items[perm[j]][2]))
                    good_this_pass += 1
                    if len(xs) == self.cfg.batch_size:
                        # Position after this batch: the next sample to read.
                        pos = (epoch, shard_i, j + 1) if j + 1 < len(items) else (epoch, shard_i + 1, 0)
                        yield self._batch(xs, ys, slot, pos, skipped, keys)
                        xs, ys, keys, skipped = [], [], [], Counter()
                shard_i, sample_i = shard_i + 1, 0
            epoch, shard_i = epoch + 1, 0
            if good_this_pass == 0:
                raise ShardSpecError(
                    f"reader slot {slot}/{total} found no valid sample in a whole pass over its shards "
                    f"{[self.urls[k] for k in order][:4]} (skipped: {dict(skipped)}); check the shards "
                    "and that their sample shape matches the model"
                )
            good_this_pass = 0
            if not self.cfg.infinite:
                if xs and not self.cfg.drop_last:
                    yield self._batch(xs, ys, slot, (epoch, 0, 0), skipped, keys)
                elif skipped:
                    yield self._batch([], [], slot, (epoch, 0, 0), skipped)
                return

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
