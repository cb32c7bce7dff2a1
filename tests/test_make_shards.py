"""make_shards: every source round-trips, manifests are right, output is deterministic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.make_shards import MakeShardsConfig, main, write_shards
from data_pipeline.sources import grid25_modes, ring8_modes
from data_pipeline.stream import ShardLoader, StreamConfig


def _write(tmp_path, **kw):
    cfg = MakeShardsConfig(out=str(tmp_path / "out"), **kw)
    return write_shards(cfg, progress=False), tmp_path / "out"


def _all(out, batch_size=1, **kw):
    loader = ShardLoader(
        StreamConfig(
            urls=str(out),
            batch_size=batch_size,
            num_workers=0,
            infinite=False,
            drop_last=False,
            shuffle=False,
            **kw,
        )
    )
    batches = list(loader)
    return np.concatenate([b["x"].numpy() for b in batches]), np.concatenate(
        [b["y"].numpy() for b in batches]
    )


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls / "nested").mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / ("nested" if i % 2 else ".") / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(
        tmp_path / "imgs" / "dogs" / "x.jpg"
    )
    (tmp_path / "imgs" / "dogs" / "broken.png").write_bytes(b"not a png")
    return tmp_path / "imgs"


def test_folder_source_round_trip(tmp_path, image_folder):
    with pytest.warns(UserWarning, match="broken.png"):
        manifest, out = _write(
            tmp_path, source="folder", src=str(image_folder), resolution=16, channels=3, shard_size=4
        )
    assert manifest["num_samples"] == 11 and manifest["skipped"] == 1
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["sample_shape"] == [3, 16, 16]
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 3]
    x, y = _all(out)
    assert x.shape == (11, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert sorted(y.tolist()) == [0] * 5 + [1] * 6


def test_folder_grayscale_and_errors(tmp_path, image_folder):
    manifest, out = _write(tmp_path, source="folder", src=str(image_folder), resolution=8, channels=1)
    assert manifest["sample_shape"] == [1, 8, 8]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        _write(tmp_path, source="folder", src=str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable samples"):
        _write(tmp_path, source="folder", src=str(tmp_path / "bad"))


def test_npz_source_like_the_seed_mnist(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (30, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=np.arange(30) % 10)
    manifest, out = _write(
        tmp_path, source="npz", src=str(tmp_path / "mnist.npz"), resolution=28, shuffle=False
    )
    assert manifest["num_samples"] == 30 and manifest["sample_shape"] == [1, 28, 28]
    x, y = _all(out)
    restored = np.rint((x[:, 0] + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(restored, images)  # lossless PNG, same order without shuffle
    assert np.array_equal(y, np.arange(30) % 10)


def test_digits_source(tmp_path):
    manifest, out = _write(tmp_path, source="digits", resolution=32, shard_size=500)
    assert manifest["num_samples"] == 1797 and len(manifest["shards"]) == 4
    x, y = _all(out, batch_size=256)
    assert x.shape == (1797, 1, 32, 32) and set(y.tolist()) == set(range(10))
    assert x.mean() < -0.3  # dark background, bright strokes


@pytest.mark.parametrize(
    "name,modes,sigma", [("ring8", ring8_modes(), 0.01), ("grid25", grid25_modes(), 0.05)]
)
def test_mixture_sources(tmp_path, name, modes, sigma):
    manifest, out = _write(tmp_path, source=name, num_samples=20_000, shard_size=5000, points_per_record=500)
    assert manifest["kind"] == "points" and manifest["sample_shape"] == [2] and len(manifest["shards"]) == 4
    x, y = _all(out, batch_size=1000)
    assert x.shape == (20_000, 2) and x.dtype == np.float32
    dist = np.linalg.norm(x - modes[y], axis=1)
    assert dist.max() < 6 * sigma and abs(dist.mean() - sigma * np.sqrt(np.pi / 2)) < 0.1 * sigma
    counts = np.bincount(y, minlength=len(modes))
    assert counts.min() > 0.7 * 20_000 / len(modes)


def test_byte_identical_and_manifest_hashes(tmp_path):
    m1, out1 = _write(tmp_path / "a", source="digits", resolution=16, shard_size=600)
    m2, out2 = _write(tmp_path / "b", source="digits", resolution=16, shard_size=600)
    for s1, s2 in zip(m1["shards"], m2["shards"]):
        b1, b2 = (out1 / s1["name"]).read_bytes(), (out2 / s2["name"]).read_bytes()
        assert b1 == b2
        assert hashlib.sha256(b1).hexdigest() == s1["sha256"] and len(b1) == s1["bytes"]
    assert json.loads((out1 / "manifest.json").read_text())["num_samples"] == 1797


def test_shards_readable_without_our_code(tmp_path):
    manifest, out = _write(tmp_path, source="digits", resolution=16, shard_size=1000)
    first = out / manifest["shards"][0]["name"]
    listing = subprocess.run(
        ["tar", "-tf", str(first)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(listing) == 2000 and listing[0].endswith(".cls") and listing[1].endswith(".png")
    with tarfile.open(first) as tf:
        assert all(m.mtime == 0 for m in tf.getmembers())
    ds = wds.WebDataset(str(first), shardshuffle=False).decode("pil")
    sample = next(iter(ds))
    assert sample["png"].size == (16, 16) and sample["cls"] in range(10)


def test_no_partial_output_on_crash(tmp_path, monkeypatch):
    import data_pipeline.make_shards as ms

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ms, "_publish", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path, source="digits", resolution=8)
    assert list((tmp_path / "out").iterdir()) == []  # staging removed, nothing that looks complete


def test_cli_errors_and_success(tmp_path, capsys):
    assert main(["source=nope"]) == 2
    assert "allowed: folder, npz, digits, stacked_digits, ring8, grid25" in capsys.readouterr().err
    assert main(["sorce=digits"]) == 2
    assert "unknown key 'sorce'" in capsys.readouterr().err
    assert main(["source=folder"]) == 2
    assert "needs src=PATH" in capsys.readouterr().err
    assert main(["source=ring8", f"out={tmp_path}/r", "num_samples=2000", "shard_size=1000"]) == 0
    assert "wrote 2000 samples in 2 shards" in capsys.readouterr().out
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.make_shards", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "resolution" in proc.stdout


def test_builtin_shards_written_once_by_runs_starting_together(tmp_path, monkeypatch):
    # The runs of a parallel sweep reach builtin_shards at the same moment: one writes, the other
    # waits and reuses, instead of rewriting the shards under a reader.
    from concurrent.futures import ThreadPoolExecutor

    from data_pipeline.shards import resolve
    from trainer.main import compose
    from trainer.services import plan as run_mod

    cfg = compose(["data.builtin=ring8"])
    calls = []

    def slow_write(mcfg, progress=False):
        calls.append(mcfg.out)
        time.sleep(0.5)  # the other run arrives while this one is writing
        write_shards(mcfg, progress=progress)

    monkeypatch.setattr(run_mod, "write_shards", slow_write)
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: run_mod.builtin_shards(cfg, tmp_path), range(2)))
    assert outs[0] == outs[1]
    assert len(calls) == 1, calls
    assert len(resolve(outs[0]).urls) == 10


def test_fraction_keeps_a_seeded_subset_of_the_source(tmp_path):
    """fraction=0.1: the small-data drills' subset: 10 % of the digits, the same ones for the
    same seed, other ones for another seed; a bad fraction names the fix."""
    subsets = []
    for i, seed in enumerate((0, 0, 1)):
        manifest, out = _write(tmp_path / str(i), source="digits", fraction=0.1, seed=seed)
        assert manifest["num_samples"] == 180  # round(1,797 x 0.1)
        subsets.append({x.tobytes() for x in _all(out)[0]})
    assert subsets[0] == subsets[1] and len(subsets[0] & subsets[2]) < 60
    with pytest.raises(ValueError, match="fraction=0 must be in \\(0, 1\\]"):
        write_shards(MakeShardsConfig(out=str(tmp_path / "bad"), fraction=0), progress=False)


def test_stacked_digits_are_rgb_by_default_and_progress_off_a_terminal_is_lines(tmp_path):
    """channels is the source's own unless set (stacked digits: 3), and piped into a log the
    progress is a line per tenth of the work, not thousands of carriage-return updates."""
    out = tmp_path / "stacked"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.make_shards",
            "source=stacked_digits",
            "num_samples=500",
            f"out={out}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sample_shape"] == [3, 32, 32] and manifest["params"]["channels"] == 3
    lines = [line for line in proc.stderr.splitlines() if line.startswith("make_shards stacked_digits:")]
    assert "\r" not in proc.stderr
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("make_shards stacked_digits: 500/500 samples")
    with pytest.raises(ValueError, match="set channels=3"):
        write_shards(
            MakeShardsConfig(source="stacked_digits", out=str(tmp_path / "x"), channels=1), progress=False
        )
