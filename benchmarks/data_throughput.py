"""Decoded samples/sec of the shard stream, against (a) reading the same tar bytes without
decoding (the I/O ceiling), (b) the same images as loose PNG files loaded with PIL through a
torch DataLoader (what an ImageFolder loader does), (c) the plain `wds.WebDataset` pipeline a
user would write (shard shuffle, 1,000-sample shuffle buffer, PIL decode, batched in the
workers) and (d) our stream with webdataset's tarfile-based tar iterator instead of our header
reader (`data.tar_reader=webdataset`). Same images, same worker count, one run; then the peak
resident memory of a loader worker streaming one large shard.

    python benchmarks/data_throughput.py [--workers 2] [--epochs 3] [--rounds 5] [--large-mb 1024]
    python benchmarks/data_throughput.py --points     # the 2-D point reader, CPU ms per batch

Images: scikit-learn's 1,797 digits as 3-channel PNGs at 32 and 64 px (warm page cache).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator

from data_pipeline.make_shards import MakeShardsConfig, write_shards
from data_pipeline.stream import ShardLoader, StreamConfig


class LooseFiles(Dataset):
    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0)


class RawTar(IterableDataset):
    """Reads every member's bytes, no decode: how fast the tars themselves can be read."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        n = 0
        for url in self.urls[wid::nw]:
            with open(url, "rb") as f:
                for member in tar_file_iterator(f):
                    n += member["fname"].endswith(".png")
                    if n == 64:
                        yield n
                        n = 0
        if n:
            yield n


def user_webdataset(urls: list[str], workers: int) -> DataLoader:
    """The pipeline webdataset's documentation leads a user to, at our batch size."""

    def to_tensor(sample: tuple) -> tuple[torch.Tensor]:
        return (torch.from_numpy(sample[0].transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0),)

    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False)
        .shuffle(1000)
        .decode("rgb8")
        .to_tuple("png")
        .map(to_tensor)
        .batched(64)
    )
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True)


def large_shard_memory(tmp: Path, megabytes: int) -> dict:
    """Peak memory of one loader worker streaming one shard of `megabytes` (64-px noise PNGs,
    stored), sampled every 50 ms from the main process: resident (RSS, which counts the pages
    the forked worker shares with its parent: torch and the rest) and unique to the worker (USS:
    what reading the shard costs); the main process's RSS for scale."""
    from data_pipeline import png

    one = png.encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), level=0)
    count = megabytes * 2**20 // (len(one) + 1024)
    shard = tmp / "large.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(count):
            info = tarfile.TarInfo(f"{i:07d}.png")
            info.size = len(one)
            tar.addfile(info, io.BytesIO(one))
    cfg = StreamConfig(urls=str(shard), batch_size=64, num_workers=1, infinite=False, verify=False)
    me, rss, uss, n, last, first = psutil.Process(), 0, 0, 0, 0.0, None
    for batch in ShardLoader(cfg):
        n += len(batch["x"])
        if time.perf_counter() - last > 0.05:
            last = time.perf_counter()
            for child in me.children():
                info = child.memory_full_info()
                rss, uss = max(rss, info.rss), max(uss, info.uss)
                first = info.uss if first is None else first
    result = {
        "shard_mb": round(shard.stat().st_size / 2**20),
        "samples": n,
        "worker_peak_rss_mb": round(rss / 2**20),
        "worker_peak_uss_mb": round(uss / 2**20),
        "worker_uss_at_first_batch_mb": round((first or 0) / 2**20),
        "main_process_rss_mb": round(me.memory_info().rss / 2**20),
    }
    shard.unlink()
    return result


def rate(make_loader, samples: int, count) -> float:
    """Samples/sec over `samples` samples from one loader, after its first batch (start-up).

    Loaders keep their worker processes across epochs (persistent workers; our stream in its
    step-based infinite mode), as a training job does: re-spawning workers every epoch of a
    1,797-image dataset would measure process start-up instead.
    """
    loader = make_loader()

    def batches():
        while True:
            yield from loader

    it = batches()
    count(next(it))
    start, n = time.perf_counter(), 0
    while n < samples:
        n += count(next(it))
    return n / (time.perf_counter() - start)


def points(tmp: Path, batches: int = 2000) -> dict:
    """2-D points as the mode-collapse runs read them (in the consumer, batch 256): CPU ms per
    batch of the stream, against slicing the same points from an in-memory array (the floor)."""
    out = tmp / "grid25"
    write_shards(
        MakeShardsConfig(source="grid25", out=str(out), num_samples=100_000, shard_size=10_000),
        progress=False,
    )
    stream = iter(ShardLoader(StreamConfig(urls=str(out), batch_size=256, num_workers=0, verify=False)))
    pts = np.concatenate([next(stream)["x"].numpy() for _ in range(400)])  # 102,400 points
    perm = np.random.default_rng(0).permutation(len(pts))

    def floor(i: int) -> torch.Tensor:
        j = (i * 256) % (len(pts) - 256)
        return torch.from_numpy(pts[perm[j : j + 256]])

    out_ms = {}
    for name, one in (("stream", lambda i: next(stream)), ("in_memory", floor)):
        start = time.process_time()
        for i in range(batches):
            one(i)
        out_ms[name] = (time.process_time() - start) / batches * 1000
    return {"batch": 256, "cpu_ms_per_batch": {k: round(v, 3) for k, v in out_ms.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--large-mb", type=int, default=1024, help="the large shard's size (0: skip)")
    p.add_argument("--points", action="store_true", help="only the 2-D point reader (CPU ms per batch)")
    args = p.parse_args()
    if args.points:
        with tempfile.TemporaryDirectory() as tmp:
            result = points(Path(tmp))
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in (32, 64):
            out = Path(tmp) / f"shards{res}"
            manifest = write_shards(
                MakeShardsConfig(source="digits", out=str(out), resolution=res, channels=3, shard_size=225),
                progress=False,
            )
            urls = [str(out / s["name"]) for s in manifest["shards"]]
            loose = Path(tmp) / f"loose{res}"
            loose.mkdir()
            for url in urls:  # the very same PNG bytes as loose files
                with open(url, "rb") as f:
                    for m in tar_file_iterator(f):
                        if m["fname"].endswith(".png"):
                            (loose / m["fname"]).write_bytes(m["data"])
            files = sorted(loose.glob("*.png"))
            stream = {"urls": str(out), "batch_size": 64, "num_workers": args.workers, "verify": False}
            readers = {
                "stream": (lambda: ShardLoader(StreamConfig(**stream)), lambda b: len(b["x"])),
                "stream_wds_tar": (
                    lambda: ShardLoader(StreamConfig(**stream, tar_reader="webdataset")),
                    lambda b: len(b["x"]),
                ),
                "user_wds": (lambda: user_webdataset(urls, args.workers), lambda b: len(b[0])),
                "raw": (
                    lambda: DataLoader(
                        RawTar(urls), batch_size=None, num_workers=args.workers, persistent_workers=True
                    ),
                    int,
                ),
                "loose": (
                    lambda: DataLoader(
                        LooseFiles(files), batch_size=64, shuffle=True, num_workers=args.workers
                    ),
                    len,
                ),
            }
            # Rounds with the readers interleaved (order rotated), medians reported: on a small
            # machine the background moves any single measurement by tens of percent.
            rates: dict[str, list[float]] = {k: [] for k in readers}
            names = list(readers)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    make, count = readers[name]
                    rates[name].append(rate(make, args.epochs * len(files), count))
            med = {k: statistics.median(v) for k, v in rates.items()}
            row = {"resolution": res, **{f"{k}_samples_per_sec": round(v) for k, v in med.items()}}
            for other in ("loose", "user_wds", "stream_wds_tar", "raw"):
                row[f"stream_vs_{other}"] = round(med["stream"] / med[other], 2)
                per_round = [a / b for a, b in zip(rates["stream"], rates[other])]
                row[f"stream_vs_{other}_rounds"] = [round(x, 2) for x in per_round]
            rows.append(row)
            print(
                f"{res}px: stream {med['stream']:.0f}/s; x{row['stream_vs_loose']} loose PNG + PIL, "
                f"x{row['stream_vs_user_wds']} a plain wds.WebDataset, x{row['stream_vs_stream_wds_tar']} "
                f"with webdataset's tar iterator, x{row['stream_vs_raw']} reading the tars undecoded",
                flush=True,
            )
        memory = large_shard_memory(Path(tmp), args.large_mb) if args.large_mb else None
        if memory:
            print(f"large shard: {json.dumps(memory)}", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"workers": args.workers, "rows": rows, "large_shard": memory}, indent=2)
        )


if __name__ == "__main__":
    main()
