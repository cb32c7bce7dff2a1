"""The 128 and 256 px ResNet pair: built from the same toolkit, trained a few steps at a tiny
width through real DeepSpeed engines under every penalty and CPU precision, fed by shards
written at that resolution."""

from __future__ import annotations

import pytest
import torch

from trainer.config import Config, ConfigError, ModelConfig, ParallelConfig
from trainer.gan.models import build_pair
from trainer.gan.models.resnet import channels_at
from trainer.gan.step import GANStep
from trainer.train.engines import Engine


def test_channels_halve_above_64_px_and_the_32_64_layout_is_unchanged():
    assert [channels_at(128, s) for s in (4, 32, 64, 128, 256)] == [128, 128, 128, 64, 32]
    G, D = build_pair(
        ModelConfig(arch="resnet", latent_dim=16, resolution=32, channels=3, g_width=32, d_width=32)
    )
    assert len(G.blocks) == 3 and len(D.blocks) == 2  # SNGAN-32: 3 up-blocks, 2 down + 2 at 8x8


@pytest.mark.parametrize("resolution", [128, 256])
@pytest.mark.parametrize("kind", ["none", "r1", "r2", "wgan_gp", "dragan"])
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (1, "bf16_autocast")])
def test_large_resnet_trains_under_every_penalty_and_precision(ds_dist, resolution, kind, stage, precision):
    cfg = Config()
    cfg.parallel = ParallelConfig(zero_stage=stage, precision=precision)
    cfg.penalty.kind, cfg.penalty.interval = kind, 1
    cfg.model.latent_dim = 8
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(
            arch="resnet",
            latent_dim=8,
            resolution=resolution,
            channels=3,
            g_width=16,
            d_width=16,
            spectral_norm="d",
        )
    )
    g = Engine(G, 1e-3, (0.0, 0.99), cfg.parallel, 4)
    d = Engine(D, 1e-3, (0.0, 0.99), cfg.parallel, 4)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
    real = torch.rand(4, 3, resolution, resolution) * 2 - 1
    before = [p.detach().float().clone() for p in d.module.parameters()]
    for _ in range(2):
        out = step.d_step(real)
        assert out["nonfinite"] == 0 and (out["penalty"] > 0) == (kind != "none")
        assert torch.isfinite(step.g_step(4)["g_loss"])
    assert any(not torch.equal(a, b.float()) for a, b in zip(before, d.module.parameters()))
    with torch.no_grad():
        assert g.module(torch.randn(2, 8).to(g.dtype)).shape == (2, 3, resolution, resolution)


def test_resolution_is_checked_per_architecture():
    cfg = Config()
    cfg.model.arch, cfg.model.resolution, cfg.model.channels = "resnet", 256, 3
    cfg.check()
    cfg.model.arch = "dcgan"
    with pytest.raises(ConfigError, match="model.resolution=256 is invalid; allowed values: 0, 32, 64$"):
        cfg.check()


def test_shards_at_128_px_stream_into_the_model_shape(tmp_path):
    from data_pipeline.make_shards import MakeShardsConfig, write_shards
    from data_pipeline.stream import ShardLoader, StreamConfig

    out = tmp_path / "digits128"
    write_shards(
        MakeShardsConfig(source="digits", out=str(out), resolution=128, channels=3, fraction=0.02), False
    )
    loader = ShardLoader(
        StreamConfig(urls=str(out), batch_size=8, num_workers=0, expected_shape=(3, 128, 128))
    )
    batch = next(iter(loader))
    assert batch["x"].shape == (8, 3, 128, 128) and -1 <= batch["x"].min() < batch["x"].max() <= 1
    assert loader.num_skipped == 0
