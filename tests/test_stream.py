"""stream: exactly-once splitting, seeded shuffles, resume, and bad data skipped and counted."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.make_shards import MakeShardsConfig, write_shards
from data_pipeline.shards import ShardSpecError, absolute, resolve
from data_pipeline.stream import ShardLoader, StreamConfig


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards(
        MakeShardsConfig(source="digits", out=str(out), resolution=8, shard_size=100), progress=False
    )
    return out  # 18 shards of <= 100 images


def _pixels_key(x: torch.Tensor) -> list[bytes]:
    return [np.asarray(t).tobytes() for t in ((x + 1) * 127.5).round().to(torch.uint8).numpy()]


def _epoch(urls, rank, world, workers, seed=0, batch_size=32, **kw):
    loader = ShardLoader(
        StreamConfig(
            urls=str(urls),
            batch_size=batch_size,
            rank=rank,
            world_size=world,
            num_workers=workers,
            seed=seed,
            infinite=False,
            drop_last=False,
            **kw,
        )
    )
    return [k for b in loader for k in _pixels_key(b["x"])], loader


def test_exactly_once_over_2_ranks_x_2_workers(digits):
    keys0, _ = _epoch(digits, 0, 2, 2)
    keys1, _ = _epoch(digits, 1, 2, 2)
    everything, _ = _epoch(digits, 0, 1, 0, shuffle=False)
    assert len(everything) == 1797
    # Disjoint across ranks, and the union is the whole dataset with no sample twice.
    from collections import Counter

    assert Counter(keys0 + keys1) == Counter(everything)
    assert 0 < len(keys0) < 1797 and len(keys0) + len(keys1) == 1797


def test_sample_keys_carry_the_epoch_and_match_the_shards(tmp_path):
    write_shards(
        MakeShardsConfig(source="ring8", out=str(tmp_path), num_samples=4000, shard_size=1000), progress=False
    )
    cfg = dict(urls=str(tmp_path), batch_size=100, num_workers=0, with_keys=True, seed=3)
    batches = itertools.islice(ShardLoader(StreamConfig(**cfg)), 80)  # 2 epochs of 40 batches
    keys = [k for b in batches for k in b["keys"]]
    # Step-based (infinite) stream: epoch 0 then epoch 1, each every point exactly once.
    for epoch in (0, 1):
        names = [k for e, k in keys if e == epoch]
        assert len(names) == len(set(names)) == 4000
    assert [e for e, _ in keys] == sorted(e for e, _ in keys)  # epochs do not interleave
    plain = next(iter(ShardLoader(StreamConfig(**{**cfg, "with_keys": False}))))
    assert "keys" not in plain


def test_points_resume_mid_shard_and_split_exactly_once_over_ranks(tmp_path):
    """2-D points are batched in slices of each shard: a batch may straddle shards, a resume
    lands mid-shard, and two ranks still read every point once per epoch."""
    write_shards(
        MakeShardsConfig(source="grid25", out=str(tmp_path), num_samples=4000, shard_size=1000),
        progress=False,
    )
    cfg = dict(urls=str(tmp_path), batch_size=96, num_workers=0, with_keys=True, seed=5)
    reference = list(itertools.islice(ShardLoader(StreamConfig(**cfg)), 60))  # > 1 epoch (41.7)
    assert all(b["x"].shape == (96, 2) and b["x"].dtype == torch.float32 for b in reference)
    assert all(b["y"].shape == (96,) and b["y"].dtype == torch.long for b in reference)
    # 96 does not divide 1000: batches straddle shards, and batch 42 takes the last 64 points
    # of epoch 0 and the first 32 of epoch 1.
    assert {tuple(b["pos"][:2]) for b in reference[:41]} == {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert tuple(reference[41]["pos"]) == (1, 0, 32)

    first = ShardLoader(StreamConfig(**cfg))
    it = iter(first)
    head = [next(it) for _ in range(17)]  # 1632 points: stops 632 into the second shard
    state = first.state_dict()
    del it
    resumed = ShardLoader(StreamConfig(**cfg))
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 43))
    for a, b in zip(head + tail, reference, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and a["keys"] == b["keys"]

    names = []
    for rank in (0, 1):
        loader = ShardLoader(
            StreamConfig(**{**cfg, "rank": rank, "world_size": 2, "infinite": False, "drop_last": False})
        )
        names += [k for b in loader for _, k in b["keys"]]
    assert len(names) == len(set(names)) == 4000


def test_too_few_shards_is_a_clear_error_unless_resampling(tmp_path):
    write_shards(
        MakeShardsConfig(source="digits", out=str(tmp_path), resolution=8, shard_size=1000), progress=False
    )
    with pytest.raises(ShardSpecError, match="2 shard.*4 readers.*data.resample=true"):
        ShardLoader(StreamConfig(urls=str(tmp_path), batch_size=8, rank=0, world_size=2, num_workers=2))
    loader = ShardLoader(
        StreamConfig(urls=str(tmp_path), batch_size=8, world_size=2, num_workers=2, resample=True)
    )
    batches = iter(loader)
    assert next(batches)["x"].shape == (8, 1, 8, 8)


def test_shuffle_is_seeded_and_changes_per_epoch(digits):
    a, _ = _epoch(digits, 0, 1, 2, seed=3)
    b, _ = _epoch(digits, 0, 1, 2, seed=3)
    c, _ = _epoch(digits, 0, 1, 2, seed=4)
    assert a == b and a != c and sorted(a) == sorted(c)

    loader = ShardLoader(StreamConfig(urls=str(digits), batch_size=1797 // 3, num_workers=0, seed=3))
    it = iter(loader)
    epoch0 = [k for _ in range(3) for k in _pixels_key(next(it)["x"])]
    epoch1 = [k for _ in range(3) for k in _pixels_key(next(it)["x"])]
    assert epoch0 != epoch1[: len(epoch0)]


def test_resample_mode_is_reproducible(digits):
    def first(seed):
        loader = ShardLoader(
            StreamConfig(urls=str(digits), batch_size=64, num_workers=2, seed=seed, resample=True)
        )
        it = iter(loader)
        return [k for _ in range(5) for k in _pixels_key(next(it)["x"])]

    assert first(1) == first(1) != first(2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_the_same_stream(digits, workers):
    cfg = StreamConfig(urls=str(digits), batch_size=50, num_workers=workers, seed=7)
    full = ShardLoader(cfg)
    it = iter(full)
    reference = [_pixels_key(next(it)["x"]) for _ in range(60)]  # > 1 epoch (1797 / 50 = 35)

    first = ShardLoader(cfg)
    it = iter(first)
    head = [_pixels_key(next(it)["x"]) for _ in range(23)]
    state = first.state_dict()
    assert state["samples_seen"] == 23 * 50
    del it

    resumed = ShardLoader(cfg)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [_pixels_key(next(it)["x"]) for _ in range(37)]
    assert head + tail == reference

    with pytest.raises(ValueError, match="keep trainer.num_workers"):
        ShardLoader(
            StreamConfig(urls=str(digits), batch_size=50, num_workers=workers + 2, seed=7)
        ).load_state_dict(state)


def test_hflip_in_workers(digits):
    plain, _ = _epoch(digits, 0, 1, 0, seed=0, shuffle=False)
    flipped_loader = ShardLoader(
        StreamConfig(
            urls=str(digits),
            batch_size=1797,
            num_workers=0,
            infinite=False,
            drop_last=False,
            shuffle=False,
            hflip=True,
        )
    )
    x = next(iter(flipped_loader))["x"]
    keys = _pixels_key(x)
    mirrored = _pixels_key(x.flip(-1))
    changed = sum(k != p for k, p in zip(keys, plain))
    assert 0.3 * 1797 < changed < 0.7 * 1797
    assert all(k == p or m == p for k, m, p in zip(keys, mirrored, plain))


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _png(shape=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path):
    _tar(
        tmp_path / "a.tar",
        {
            "0.png": _png(),
            "0.cls": b"1",
            "1.png": b"garbage",
            "2.png": _png((9, 9)),
            "3.txt": b"no image",
            "4.png": _png(),
        },
    )
    good = tmp_path / "b.tar"
    _tar(good, {f"{i}.png": _png() for i in range(10)})
    truncated = tmp_path / "c.tar"
    truncated.write_bytes(good.read_bytes()[:2600])  # cut inside the 3rd member
    (tmp_path / "d.tar").write_bytes(b"\x00not a tar at all" * 100)
    loader = ShardLoader(
        StreamConfig(
            urls=[str(tmp_path / f"{c}.tar") for c in "abcd"],
            batch_size=1,
            num_workers=2,
            infinite=False,
            expected_shape=(1, 8, 8),
            verify=False,
        )
    )
    n = sum(len(b["x"]) for b in loader)  # warnings are printed by the worker processes
    assert n == 2 + 10 + 2
    assert loader.skipped["decode_error"] == 1
    assert loader.skipped["bad_shape"] == 1
    assert loader.skipped["missing_field"] == 1
    assert loader.skipped["unreadable_shard"] == 2  # truncated + not a tar
    assert loader.num_skipped == 3


def test_a_shard_of_a_few_kb_claiming_a_huge_image_is_skipped_and_counted(tmp_path):
    """Hostile data: one member claims 100,000 x 100,000 pixels (10 GB as gray); the loader
    workers skip it before inflating anything and count it; the other samples stream on."""
    from tests.test_png import _claiming

    shard = tmp_path / "hostile.tar"
    _tar(shard, {"0.png": _png(), "1.png": _claiming(100_000, 100_000, bytes(1000)), "2.png": _png()})
    assert shard.stat().st_size <= 10_240  # one tar record
    loader = ShardLoader(
        StreamConfig(
            urls=[str(shard)],
            batch_size=1,
            num_workers=1,
            infinite=False,
            expected_shape=(1, 8, 8),
            verify=False,
        )
    )
    assert sum(len(b["x"]) for b in loader) == 2
    assert loader.skipped["too_large"] == 1 and loader.num_skipped == 1, loader.skipped


def test_nothing_readable_raises_instead_of_hanging(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"junk" * 300)
    loader = ShardLoader(
        StreamConfig(urls=str(tmp_path / "x.tar"), batch_size=4, num_workers=0, verify=False)
    )
    with pytest.warns(UserWarning), pytest.raises(ShardSpecError, match="no valid sample in a whole pass"):
        next(iter(loader))


def test_pipe_urls(digits):
    urls = [f"pipe:cat {p}" for p in sorted(digits.glob("*.tar"))]
    loader = ShardLoader(
        StreamConfig(
            urls=urls,
            batch_size=100,
            num_workers=2,
            infinite=False,
            drop_last=False,
            expected_shape=(1, 8, 8),
        )
    )
    assert sum(len(b["x"]) for b in loader) == 1797
    failing = ShardLoader(
        StreamConfig(urls=["pipe:false"], batch_size=1, num_workers=0, expected_shape=(1, 8, 8))
    )
    with pytest.warns(UserWarning), pytest.raises(ShardSpecError):
        next(iter(failing))


def test_spec_errors_name_the_problem(digits, tmp_path):
    with pytest.raises(ShardSpecError, match="malformed brace pattern"):
        resolve(str(digits / "digits-{000000..000003.tar"))
    with pytest.raises(ShardSpecError, match=r"82 shard\(s\) not found: .*digits-000018.tar.* and 79 more"):
        resolve(str(digits / "digits-{000000..000099}.tar"))
    with pytest.raises(ShardSpecError, match="no .tar shards"):
        resolve(str(tmp_path))
    with pytest.raises(ShardSpecError, match="no shards given"):
        resolve("")
    assert len(resolve(str(digits / "digits-{000000..000003}.tar")).urls) == 4
    assert len(resolve([str(digits / "digits-000000.tar"), str(digits / "digits-000001.tar")]).urls) == 2
    assert len(resolve(str(digits / "manifest.json")).urls) == 18
    assert len(resolve(f"file://{digits}/digits-000000.tar").urls) == 1


def test_relative_paths_become_absolute_and_urls_stay(monkeypatch, tmp_path):
    """Ray's workers run in other folders: the driver hands them absolute paths."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute("shards/faces") == str(tmp_path / "shards" / "faces")
    assert absolute("~/x-{0..3}.tar") == str(tmp_path / "home" / "x-{0..3}.tar")
    kept = ["pipe:aws s3 cp s3://b/x.tar -", "s3://b/x.tar", "file:///data/x.tar", "/data/x.tar", ""]
    assert absolute(kept) == kept and absolute("") == ""


def test_manifest_checksum_mismatch(tmp_path):
    write_shards(
        MakeShardsConfig(source="digits", out=str(tmp_path), resolution=8, shard_size=500), progress=False
    )
    shard = tmp_path / "digits-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardSpecError, match="digits-000001.tar does not match the sha256"):
        ShardLoader(StreamConfig(urls=str(tmp_path), batch_size=8, num_workers=0))
    shard.write_bytes(bytes(data[:1024]))
    with pytest.raises(ShardSpecError, match="truncated"):
        ShardLoader(StreamConfig(urls=str(tmp_path), batch_size=8, num_workers=0))


def _fast_members(data: bytes) -> tuple[list[tuple[str, bytes]], list[Exception]]:
    from data_pipeline.stream import _guarded, fast_tar_files

    errors: list[Exception] = []
    files = _guarded(fast_tar_files(io.BufferedReader(io.BytesIO(data)), "u", errors.append), errors.append)
    return [(f["fname"], f["data"]) for f in files], errors


def test_fast_tar_reader_agrees_with_tarfile_and_falls_back(digits, tmp_path):
    import gzip

    from webdataset.tariterators import tar_file_iterator

    from data_pipeline.stream import shard_samples

    shard = sorted(digits.glob("*.tar"))[0]
    data = shard.read_bytes()
    members, errors = _fast_members(data)
    reference = [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]
    assert not errors and members == reference and len(members) == 200  # png + cls per image

    # PAX records (long names) and gzip go on to webdataset's tarfile iterator, and still read.
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in [("d" * 120 + "/0001.cls", b"3"), ("plain.cls", b"4")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    gz = tmp_path / "x.tar.gz"
    gz.write_bytes(gzip.compress(data))
    for url in (pax, gz):
        errors = []
        samples = list(shard_samples(str(url), errors.append))
        assert not errors and samples
    assert {s["__key__"] for s in shard_samples(str(pax), print)} == {"d" * 120 + "/0001", "plain"}
    assert len(list(shard_samples(str(gz), print))) == 100

    # A damaged header after the 10th member: the first 10 are kept, the damage reported.
    offsets = [0]
    for _, payload in members[:10]:
        offsets.append(offsets[-1] + 512 + (len(payload) + 511) // 512 * 512)
    broken = bytearray(data)
    broken[offsets[10] + 3] ^= 0x55  # inside the 11th member's name: its checksum fails
    kept, errors = _fast_members(bytes(broken))
    assert kept == members[:10] and len(errors) == 1
    # Cut at a member boundary (no end-of-archive blocks): reported as truncated.
    kept, errors = _fast_members(data[: offsets[10]])
    assert kept == members[:10] and "truncated" in str(errors[0])


# User stages for the tests below, importable as 'tests.test_stream:NAME' (as the config names them).
def invert(sample: dict) -> dict:
    sample["png"] = 255 - sample["png"]
    return sample


def drop_class_1(sample: dict) -> dict | None:
    return None if sample.get("cls") == 1 else sample


def blank_png(key: str, data: bytes) -> np.ndarray | None:
    return np.zeros((1, 8, 8), np.uint8) if key == ".png" else None


def test_user_stages_and_decoders_run_in_the_pipeline(digits):
    plain, _ = _epoch(digits, 0, 1, 0, shuffle=False)
    inverted, _ = _epoch(digits, 0, 1, 2, shuffle=False, stages=["tests.test_stream:invert"])
    assert sorted(inverted) == sorted(bytes(255 - b for b in k) for k in plain)  # names, in workers
    kept, loader = _epoch(digits, 0, 1, 0, stages=[drop_class_1])  # a callable, from Python
    assert len(kept) == 1797 - 182 and loader.skipped["filtered"] == 182  # digits has 182 ones
    blank, _ = _epoch(digits, 0, 1, 0, decoders=["tests.test_stream:blank_png"])
    assert set(blank) == {bytes(64)}  # the user's decoder is tried before ours
    with pytest.raises(ShardSpecError, match="cannot be imported"):
        _epoch(digits, 0, 1, 0, stages=["tests.test_stream:nope"])


@pytest.mark.slow
def test_a_large_shard_streams_in_bounded_memory(tmp_path):
    """A ~400 MB shard (30,000 64-px images) read with the default 1,000-sample shuffle buffer:
    the reader's resident memory grows by less than 0.3x the shard (the issue's bound, 300 MB
    for 1 GB, in proportion). The old reader held the whole shard."""
    import subprocess
    import sys

    from data_pipeline import png

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    one = png.encode(noise, level=0)  # ~12 KB, stored
    shard = tmp_path / "big.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(30_000):
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(one)
            tar.addfile(info, io.BytesIO(one))
    size = shard.stat().st_size
    code = f"""
import os
from data_pipeline.stream import ShardLoader, StreamConfig
loader = ShardLoader(StreamConfig(urls={str(shard)!r}, batch_size=64, num_workers=0, infinite=False,
                                  verify=False, expected_shape=(3, 64, 64)))
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before, n, peak = resident(), 0, 0
for b in loader:  # resident memory after every batch: the reader's buffer and what it decoded
    n, peak = n + len(b["x"]), max(peak, resident())
print(n, peak - before)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    n, grown = map(int, out.stdout.split())
    assert n == 30_000 // 64 * 64  # full batches
    assert grown < 0.3 * size, f"peak memory grew by {grown / 1e6:.0f} MB reading a {size / 1e6:.0f} MB shard"
