"""Evaluation: the digits classifier, feature networks, metrics against their libraries, the
real-data cache, stacked digits and the 2-D scores that over-narrow samples cannot fake."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import prdc
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from data_pipeline.make_shards import MakeShardsConfig, write_shards
from data_pipeline.sources import grid25_modes, mixture_source
from data_pipeline.stream import ShardLoader, StreamConfig
from trainer.config import ConfigError, EvalConfig
from trainer.eval import digits, features, metrics
from trainer.eval.evaluator import Evaluator, NonFiniteSamples


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards(MakeShardsConfig(source="digits", out=str(out), shard_size=400), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def stacked_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stacked")
    cfg = MakeShardsConfig(
        source="stacked_digits", out=str(out), channels=3, num_samples=3000, shard_size=1000
    )
    write_shards(cfg, progress=False)
    return str(out)


class Noise(nn.Module):
    """A generator of smooth random blobs: a fixed, non-trivial distribution far from digits."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z[:, : 4 * self.channels].unflatten(1, (self.channels, 2, 2))
        return torch.tanh(nn.functional.interpolate(x, size=32, mode="bilinear"))


class Copies(nn.Module):
    """Returns one of `bank`'s images per latent: a perfect memorizer (or, with one image, collapse)."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", bank)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.bank[(z[:, 0].abs() * 1e4).long() % len(self.bank)]


def real_images(urls: str, num: int) -> torch.Tensor:
    """The first `num` images of the shards, in the order the evaluator reads them."""
    cfg = StreamConfig(urls, 500, num_workers=0, shuffle=False, infinite=False, drop_last=False)
    return torch.cat([b["x"] for b in ShardLoader(cfg)])[:num]


# --- the digits classifier -------------------------------------------------------------------


def test_shipped_digits_classifier_reaches_97_percent_on_held_out_digits():
    net = digits.load()
    x, y = digits.dataset()
    _, held_out = digits.split(len(x))
    with torch.no_grad():
        acc = float((net(x[held_out]).argmax(1) == y[held_out]).float().mean())
    assert len(held_out) == 360 and acc >= 0.97
    assert acc == pytest.approx(net.heldout_accuracy)  # the number stored beside the weights


# --- metrics against the libraries -------------------------------------------------------------


def test_our_numbers_are_the_libraries_numbers_on_the_same_features(digit_shards):
    opts = EvalConfig(features="digits", num=600, batch_size=200, seed=3)
    ev = Evaluator(digit_shards, opts, progress=False)
    G = Noise()
    ours = ev(G, 8).metrics
    real = real_images(digit_shards, 600)
    z = torch.randn(600, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fake = G(z)
    net = features.DigitsFeatures()
    net.num_features = digits.NUM_FEATURES  # one channel: torchmetrics needs the width up front
    fid = FrechetInceptionDistance(feature=net)  # the library fed images through our network
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-5)
    kid = KernelInceptionDistance(feature=net, subsets=100, subset_size=600)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(3)
    kid_mean, _ = kid.compute()
    assert ours["kid"] == pytest.approx(float(kid_mean), rel=1e-4)
    with torch.no_grad():
        expected = prdc.compute_prdc(net(real).numpy(), net(fake).numpy(), nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(expected[key]), abs=1e-6)
    assert ours["fid"] > 50 * ev.data_row().metrics["fid"]  # blobs are far from digits


def test_a_diverged_generator_is_refused_before_fid(digit_shards):
    """NaN features would reach FID's matrix square root, where LAPACK segfaults (seen in a
    drill): the evaluator refuses them with a clear error instead."""
    ev = Evaluator(digit_shards, EvalConfig(features="digits", num=300), progress=False)

    def half_nan(z: torch.Tensor) -> torch.Tensor:
        x = Noise()(z)
        x[::2] = float("nan")
        return x

    with pytest.raises(NonFiniteSamples, match="150 of 300 samples are not finite: the generator diverged"):
        ev(half_nan, 8)


def test_a_memorizer_scores_near_the_data_and_a_collapsed_generator_does_not(digit_shards):
    ev = Evaluator(digit_shards, EvalConfig(features="digits", num=1000), progress=False)
    real = real_images(digit_shards, 1797)
    good = ev(Copies(real), 8).metrics
    collapsed = ev(Copies(real[:3]), 8).metrics  # three images, perfectly sharp
    data = ev.data_row().metrics
    assert good["fid"] < 2 * data["fid"] + 1 and good["recall"] > 0.9
    assert collapsed["precision"] > 0.9  # every sample is a real digit ...
    assert collapsed["recall"] < 0.1 and collapsed["coverage"] < 0.1  # ... but three of them
    assert collapsed["fid"] > 10 * good["fid"]


# --- feature networks ----------------------------------------------------------------------------


class StandInInception(nn.Module):
    """The interface of the FID Inception TorchScript (uint8 NCHW RGB in, 2048 pool features
    with return_features=True): a fixed random projection, cheap enough for CPU tests."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3, "uint8 RGB expected"
        pooled = nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 8).flatten(1)
        f = torch.relu(self.proj(pooled))
        return f if return_features else f[:, :1008]


def make_standin_inception(path) -> None:
    torch.manual_seed(0)
    torch.jit.script(StandInInception()).save(str(path))


def test_inception_path_with_a_standin_torchscript_file(digit_shards, tmp_path):
    path = tmp_path / "inception-standin.pt"
    make_standin_inception(path)
    opts = EvalConfig(features="inception", inception_weights=str(path), num=400)
    ev = Evaluator(digit_shards, opts, progress=False)
    assert ev.real.shape == (400, 2048) and ev.net.name.startswith("inception:")
    result = ev(Noise(), 8)
    fid = FrechetInceptionDistance(feature=features.InceptionFeatures(path))
    fid.update(real_images(digit_shards, 400), real=True)
    with torch.no_grad():
        fid.update(Noise()(torch.randn(400, 8, generator=torch.Generator().manual_seed(0))), real=False)
    assert result.metrics["fid"] == pytest.approx(float(fid.compute()), rel=1e-5)
    # [-1, 1] is quantized as StyleGAN2-ADA does: -1 -> 0, 1 -> 255, 0 -> 128.
    probe = features.InceptionFeatures(path)
    probe.net = torch.jit.script(_Echo())
    assert probe(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)).flatten().tolist()[:3] == [0, 128, 255]


class _Echo(nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.flatten(1)


def test_inception_without_the_file_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLEGAN_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(features.urllib.request, "urlretrieve", offline)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights=PATH"):
        features.load("inception")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        features.load("inception", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="digits, inception, a TorchScript file"):
        features.load("vgg")


def tiny_features() -> nn.Module:
    """A user's feature network (`eval.features=tests.test_evaluation:tiny_features`)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 32))


def test_a_users_network_by_factory_or_torchscript(digit_shards, tmp_path):
    by_factory = Evaluator(digit_shards, EvalConfig(features="tests.test_evaluation:tiny_features", num=300))
    path = tmp_path / "mine.pt"
    torch.jit.script(tiny_features()).save(str(path))
    by_file = Evaluator(digit_shards, EvalConfig(features=str(path), num=300), progress=False)
    assert by_factory.real.shape == by_file.real.shape == (300, 32)
    np.testing.assert_allclose(by_factory.real, by_file.real, rtol=1e-5, atol=1e-6)
    assert by_factory.net.name != by_file.net.name  # cached and compared apart
    with pytest.raises(ValueError, match="cannot import"):
        features.load("tests.test_evaluation:nope")


def test_real_features_are_cached_by_manifest_hash(digit_shards, tmp_path, monkeypatch):
    opts = EvalConfig(features="digits", num=500, cache_dir=str(tmp_path))
    first = Evaluator(digit_shards, opts, progress=False)
    [cached] = tmp_path.glob("*.npz")
    meta = json.loads(str(np.load(cached)["meta"]))
    assert meta["data_sha256"] == first.data_sha256 and len(first.data_sha256) == 64

    def no_reading(self, num):
        raise AssertionError("the shards were read again")

    monkeypatch.setattr(Evaluator, "_real_images", no_reading)
    again = Evaluator(digit_shards, opts, progress=False)
    np.testing.assert_array_equal(first.real, again.real)
    with pytest.raises(AssertionError, match="read again"):  # another count is another entry
        Evaluator(digit_shards, EvalConfig(features="digits", num=400, cache_dir=str(tmp_path)))


# --- stacked digits -----------------------------------------------------------------------------


def test_stacked_digits_shards_are_deterministic_with_1000_labelled_classes(stacked_shards, tmp_path):
    from data_pipeline.shards import resolve

    shards = resolve(stacked_shards)
    assert shards.sample_shape == (3, 32, 32) and len(shards.manifest["classes"]) == 1000
    again = tmp_path / "again"
    cfg = MakeShardsConfig(
        source="stacked_digits", out=str(again), channels=3, num_samples=3000, shard_size=1000
    )
    manifest = write_shards(cfg, progress=False)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in shards.manifest["shards"]]
    with pytest.raises(ValueError, match="channels=3"):
        write_shards(MakeShardsConfig(source="stacked_digits", out=str(tmp_path / "x"), channels=1))


def test_stacked_scorer_reads_each_channel_and_counts_modes(stacked_shards):
    ev = Evaluator(stacked_shards, EvalConfig(num=1000, mode_samples=3000), progress=False)
    assert ev.net.name.startswith("digits:")  # auto picks the digits network for digit data
    cfg = StreamConfig(stacked_shards, 500, num_workers=0, shuffle=False, infinite=False, drop_last=False)
    batch = next(iter(ShardLoader(cfg)))
    labels = ev.net.labels(batch["x"]).numpy()
    truth = batch["y"].numpy()
    read = (labels * np.array([100, 10, 1])).sum(1)
    assert (read == truth).mean() > 0.95  # 99 % per channel -> about 97 % per stacked sample
    data = ev.data_row().metrics
    assert data["modes"] > 900  # 3,000 draws over 1,000 modes leave ~50 empty
    collapsed = ev(Copies(batch["x"][:1]), 8).metrics
    assert collapsed["modes"] == 1 and collapsed["mode_kl"] == pytest.approx(math.log(1000))


def test_stacked_modes_definition():
    labels = np.array([[1, 2, 3]] * 3 + [[0, 0, 0]])
    out = metrics.stacked_modes(labels)
    assert out["modes"] == 2
    assert out["mode_kl"] == pytest.approx(0.75 * math.log(750) + 0.25 * math.log(250))


# --- 2-D: what over-narrow samples cannot fake ---------------------------------------------------


def test_points_on_the_mode_centres_beat_the_data_on_quality_but_not_on_spread_or_distance():
    modes, sigma = grid25_modes(), 0.05
    draw = mixture_source("grid25", 20_000, seed=5)
    data = np.stack([draw.load(i) for i in range(len(draw))])
    fresh, twin = data[:10_000], data[10_000:]
    narrow = np.repeat(modes, 400, axis=0)
    d = metrics.point_metrics(twin, modes, sigma, fresh)
    n = metrics.point_metrics(narrow, modes, sigma, fresh)
    assert n["high_quality"] == 1.0 > d["high_quality"] > 0.98  # the trap of the old table
    assert 0.95 < d["spread"] < 1.0 and n["spread"] == 0.0
    assert n["mmd"] > 5 * d["mmd"]  # the kernel at the modes' width sees the missing spread
    assert n["swd"] > d["swd"]  # the sliced distance barely does: its floor is the mass per mode


def test_sliced_wasserstein_is_zero_on_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 2))
    assert metrics.sliced_wasserstein(a, a) == 0.0
    near, far = metrics.sliced_wasserstein(a, a + 0.1), metrics.sliced_wasserstein(a, a + 1.0)
    assert 0 < near < far and far == pytest.approx(10 * near, rel=1e-6)


def test_evaluator_on_2d_shards_prints_the_datas_own_row(tmp_path):
    cfg = MakeShardsConfig(source="ring8", out=str(tmp_path), num_samples=20_000, shard_size=10_000)
    write_shards(cfg, progress=False)
    ev = Evaluator(str(tmp_path), EvalConfig(num=5000), progress=False)
    data = ev.data_row()
    assert data.metrics["modes_covered"] == 8 and 0.95 < data.metrics["spread"] < 1.0
    with pytest.raises(NonFiniteSamples, match="5000 of 5000 samples are not finite"):
        ev(lambda z: torch.full((len(z), 2), float("nan")), 4)
    centre = ev(lambda z: torch.zeros(len(z), 2), 4).metrics  # everything at the origin
    assert centre["modes_covered"] == 0 and centre["swd"] > 10 * data.metrics["swd"]
    assert centre["mmd"] > 10 * data.metrics["mmd"]
    assert data.info["features"] == "points"


def test_neighbour_metrics_in_blocks_equal_prdc_and_catch_copies(monkeypatch):
    """Blockwise precision / recall / density / coverage equal prdc's whole-matrix values, at any
    block size; memorization is near 1 for copies of the real images, near its quantile (0.05)
    for fresh draws of the same distribution."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 16)).astype(np.float32)
    fake = (1.2 * rng.normal(size=(500, 16))).astype(np.float32)
    whole = metrics.neighbour_metrics(real, fake, 5)
    monkeypatch.setattr(metrics, "BLOCK_FLOATS", 5_000)  # blocks of 8-10 rows
    blocked = metrics.neighbour_metrics(real, fake, 5)
    expected = prdc.compute_prdc(real, fake, nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert blocked[key] == pytest.approx(float(expected[key]), abs=1e-6), key
        assert whole[key] == pytest.approx(float(expected[key]), abs=1e-6), key
    assert blocked["memorization"] == whole["memorization"]
    copies = real[rng.integers(0, len(real), 500)] + rng.normal(scale=1e-3, size=(500, 16)).astype(np.float32)
    fresh = rng.normal(size=(500, 16)).astype(np.float32)
    assert metrics.neighbour_metrics(real, copies, 5)["memorization"] > 0.95
    assert metrics.neighbour_metrics(real, fresh, 5)["memorization"] < 0.15


def _scores() -> dict[str, float]:
    """FID / KID of two fixed draws of 64 eight-dimensional features."""
    rng = np.random.default_rng(0)
    return metrics.fid_kid(rng.normal(size=(64, 8)), rng.normal(size=(64, 8)), 0, 2)


def _score_on_rank0_alone(rank: int, store: str, out: str) -> None:
    """One of two gloo ranks: rank 0 scores FID / KID while rank 1 already waits in the
    broadcast both meet at next (as a training worker waits in the guard's), 30 s at most."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        scores = [_scores() if rank == 0 else None]
        dist.broadcast_object_list(scores, src=0)
        Path(f"{out}.{rank}").write_text(json.dumps(scores[0]))
    finally:
        dist.destroy_process_group()


def test_rank0_scores_alone_while_the_other_ranks_train(tmp_path):
    """Evaluation runs on rank 0 alone: its metrics never enter a collective of the workers'
    process group (torchmetrics syncs by default: the other ranks never join, the run hangs)."""
    out = tmp_path / "scores"
    torch.multiprocessing.spawn(_score_on_rank0_alone, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    alone = json.loads(Path(f"{out}.0").read_text())
    assert json.loads(Path(f"{out}.1").read_text()) == alone
    assert alone == _scores()


def test_the_inception_file_is_checked_against_its_pinned_digest(monkeypatch, tmp_path):
    """A user's pin (eval.inception_sha256) or the digest recorded at download: a file that
    differs is refused before TorchScript loads it."""
    import hashlib

    standin = tmp_path / "standin.pt"
    make_standin_inception(standin)
    digest = hashlib.sha256(standin.read_bytes()).hexdigest()
    assert features.load("inception", str(standin), digest).name == f"inception:{digest[:12]}"
    with pytest.raises(ValueError, match="not the pinned"):
        features.load("inception", str(standin), "0" * 64)
    with pytest.raises(ConfigError, match="inception_sha256"):
        EvalConfig(inception_sha256="abc").check()
    # the download path: the digest is recorded once, and a cached file swapped later is refused
    monkeypatch.setenv("STABLEGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        features.urllib.request, "urlretrieve", lambda url, to: to.write_bytes(standin.read_bytes())
    )
    assert features.inception_file("") == (tmp_path / "cache" / features.INCEPTION_FILE, digest)
    assert (tmp_path / "cache" / (features.INCEPTION_FILE + ".sha256")).read_text().strip() == digest
    (tmp_path / "cache" / features.INCEPTION_FILE).write_bytes(b"not the file that was downloaded")
    with pytest.raises(ValueError, match="recorded at download"):
        features.inception_file("")
