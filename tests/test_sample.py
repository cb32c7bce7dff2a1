"""`trainer.sample`'s options on real registered generators (a local MLflow store): explicit
seeds, truncation, one PNG per sample, interpolation as a grid and a GIF, batching, errors."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import sample as S
from trainer.config import Config
from trainer.services import tracking
from trainer.services.conclude import build_generator


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with a small DCGAN (1 x 32 x 32, latent 8) and a 2-D MLP generator."""
    root = tmp_path_factory.mktemp("sample")
    uri = f"sqlite:///{root}/m.db"
    img = Config()
    img.model.arch, img.model.latent_dim, img.model.g_width = "dcgan", 8, 8
    run_id, _ = tracking.start_run(uri, "sample", "run-s", asdict(img))
    torch.manual_seed(0)
    tracking.register_generator(uri, run_id, build_generator(img), 8, "img", {})
    pts = Config()
    pts.model.g_width, pts.model.depth = 16, 1
    tracking.register_generator(uri, run_id, build_generator(pts), pts.model.latent_dim, "pts", {})
    return uri


def draw(uri: str, **kw) -> np.ndarray:
    return S.sample("models:/img/1", tracking_uri=uri, **kw)


def test_a_seed_gives_the_same_sample_in_any_list(store):
    both = draw(store, seeds="3,5")
    alone = draw(store, seeds=[5])
    assert both.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(both[1], alone[0], atol=1e-6)
    assert np.abs(both[0] - both[1]).max() > 1e-3
    assert S.parse_seeds("1,5,9-11") == [1, 5, 9, 10, 11]
    for bad in ("1,x", "5-2", "-3"):
        with pytest.raises(ValueError, match="seeds="):
            S.parse_seeds(bad)


def test_truncation_pulls_samples_toward_the_mean_latents_image(store):
    center = draw(store, seeds=[0], psi=1e-6)[0]  # G(~0)
    full, half = draw(store, num=64), draw(store, num=64, psi=0.5)
    np.testing.assert_allclose(draw(store, num=64, psi=1.0), full)
    assert np.abs(half - center).mean() < np.abs(full - center).mean()
    assert half.std(0).mean() < full.std(0).mean()  # less variety
    with pytest.raises(ValueError, match="psi"):
        S.sample("models:/pts/1", num=8, psi=0.5, tracking_uri=store)


def test_one_png_per_sample_named_by_seed(store, tmp_path):
    out = tmp_path / "pngs"
    draw(store, seeds="7,8,9", out=f"{out}/")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["seed000007.png", "seed000008.png", "seed000009.png"]
    with Image.open(out / "seed000008.png") as img:
        assert img.size == (32, 32) and img.mode == "L"
        pixels = np.asarray(img).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(pixels, draw(store, seeds=[8])[0, 0], atol=1 / 127.5 + 1e-6)
    draw(store, num=5, out=tmp_path / "plain")  # no suffix: a folder too
    assert len(list((tmp_path / "plain").glob("*.png"))) == 5


def test_interpolation_runs_from_seed_to_seed(store, tmp_path):
    walk = draw(store, seeds="1,2,3", interpolate=6, out=tmp_path / "walk.png")
    ends = draw(store, seeds="1,2,3")
    assert walk.shape == (12, 1, 32, 32)  # two rows of 6
    np.testing.assert_allclose(walk[0], ends[0], atol=1e-5)
    np.testing.assert_allclose(walk[5], ends[1], atol=1e-5)
    np.testing.assert_allclose(walk[11], ends[2], atol=1e-5)
    steps = np.abs(np.diff(walk[:6], axis=0)).mean(axis=(1, 2, 3))
    assert steps.max() < np.abs(ends[0] - ends[1]).mean()  # small steps, not a jump
    with Image.open(tmp_path / "walk.png") as grid:
        assert grid.size == (6 * 34 + 2, 2 * 34 + 2)
    frames = draw(store, seeds="1,2,3", interpolate=4, out=tmp_path / "walk.gif")
    assert len(frames) == 12  # a loop: 3 segments of 4, each leaving out its end
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == 12 and gif.size == (32, 32)


def test_slerp_keeps_the_latent_norm():
    a, b = torch.randn(1, 512), torch.randn(1, 512)
    path = S.slerp(a.expand(11, -1), b.expand(11, -1), torch.linspace(0, 1, 11))
    norms = path.norm(dim=1)
    assert norms.min() > 0.9 * min(a.norm(), b.norm())  # a straight line dips to ~0.7
    # assert_close returns None: each endpoint gets its own call (an `and` skipped the second)
    torch.testing.assert_close(path[0], a[0])
    torch.testing.assert_close(path[-1], b[0], rtol=1e-4, atol=1e-4)


def test_batches_give_the_same_samples(store):
    np.testing.assert_allclose(draw(store, num=10, batch_size=3), draw(store, num=10), atol=1e-6)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"out": "x.gif"}, "a .gif is an interpolation"),
        ({"interpolate": 1}, "2 or more steps"),
        ({"interpolate": 4, "seeds": "3"}, "two or more seeds"),
        ({"psi": 0}, "psi=0 must be > 0"),
        ({"out": "x.jpg"}, "use a .png"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_options_fail_before_loading(kw, message):
    with pytest.raises(ValueError, match=message):
        S.sample("models:/never/1", tracking_uri="sqlite:////nonexistent/m.db", **kw)


def test_command_line_takes_the_new_keys(store, tmp_path, capsys):
    out = tmp_path / "cli.npz"
    rc = S.main(["model=models:/img/1", f"tracking.uri={store}", "seeds=4,6", "psi=0.7", f"out={out}"])
    assert rc == 0 and "wrote 2 samples" in capsys.readouterr().out
    saved = np.load(out)
    assert saved["seeds"].tolist() == [4, 6]
    np.testing.assert_allclose(saved["samples"], draw(store, seeds="4,6", psi=0.7), atol=1e-6)
    assert S.main(["model=models:/pts/1", f"tracking.uri={store}", "psi=0.5", f"out={tmp_path}/p.png"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_the_gpu_matches_the_cpu(store):
    np.testing.assert_allclose(
        draw(store, num=300, device="cuda", batch_size=128), draw(store, num=300, device="cpu"), atol=1e-3
    )
