"""Class-conditional generation: conditional batch norm in G, a projection D, labels from the
shards through GANStep, and a registered generator sampled by class."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from trainer.config import Config, ConfigError, ModelConfig
from trainer.gan.models import build_pair
from trainer.gan.models.blocks import labels_from_latent
from trainer.gan.step import GANStep
from trainer.train.engines import Engine


def test_labels_drawn_from_the_latent_are_uniform_and_fixed_by_z():
    z = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0))
    y = labels_from_latent(z, 10)
    counts = torch.bincount(y, minlength=10).float() / len(y)
    assert counts.min() > 0.09 and counts.max() < 0.11
    assert torch.equal(y, labels_from_latent(z.clone(), 10))


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conditional_pair_uses_the_labels(arch):
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(
            arch=arch,
            latent_dim=8,
            resolution=32,
            channels=1,
            g_width=16,
            d_width=16,
            conditional=True,
            num_classes=10,
        )
    )
    with torch.no_grad():
        for m in G.modules():  # per-class gains that differ, as training makes them
            if hasattr(m, "gain"):
                m.gain.weight.uniform_(0.5, 1.5)
                m.bias.weight.uniform_(-0.5, 0.5)
    G.eval()
    z = torch.randn(4, 8)
    a, b = G(z, torch.full((4,), 3)), G(z, torch.full((4,), 7))
    assert not torch.allclose(a, b)
    assert torch.equal(G(z), G(z, labels_from_latent(z, 10)))  # no labels: the ones z implies
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    s3, s7, none = D(x, torch.full((4,), 3)), D(x, torch.full((4,), 7)), D(x)
    assert not torch.allclose(s3, s7)
    phi_term = D.project(torch.ones(1, D.project.embed.embedding_dim), torch.tensor([3]))
    assert phi_term.shape == (1,)
    assert none.shape == (4,)  # without labels: D's unconditional logit alone


def test_conditional_needs_an_image_model():
    cfg = Config()
    cfg.model.conditional = True
    with pytest.raises(ConfigError, match="model.conditional=true is for image models"):
        cfg.check()


def _conditional_step(kind: str, classes: int = 10) -> GANStep:
    cfg = Config()
    cfg.model.arch, cfg.model.latent_dim, cfg.model.conditional, cfg.model.num_classes = (
        "dcgan",
        8,
        True,
        classes,
    )
    cfg.penalty.kind = kind
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(
            arch="dcgan",
            latent_dim=8,
            resolution=32,
            channels=1,
            g_width=8,
            d_width=8,
            conditional=True,
            num_classes=classes,
        )
    )
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    return GANStep(g, d, cfg, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["none", "r1", "r2", "wgan_gp", "dragan"])
def test_conditional_step_trains_under_every_penalty(ds_dist, kind):
    step = _conditional_step(kind)
    real, labels = torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8)
    embed = step.D.module.project.embed.weight
    before = embed.detach().clone()
    out = step.d_step(real, labels)
    assert out["nonfinite"] == 0 and (out["penalty"] > 0) == (kind != "none")
    assert not torch.equal(before, embed.detach())  # the projection learned from the labels
    gain = step.G.module.project[1].gain.weight
    g_before = gain.detach().clone()
    assert torch.isfinite(step.g_step(8)["g_loss"])
    assert not torch.equal(g_before, gain.detach())  # G's class gains learned


def test_missing_labels_in_a_conditional_run_name_the_fix(ds_dist):
    step = _conditional_step("r1")
    with pytest.raises(ValueError, match="-1 is a sample without a label.*model.conditional=false"):
        step.d_step(torch.rand(8, 1, 32, 32), torch.full((8,), -1))


def test_class_count_comes_from_the_shards(tmp_path):
    from data_pipeline.make_shards import MakeShardsConfig, write_shards
    from trainer.services.plan import UserError, check_data

    out = tmp_path / "digits"
    write_shards(MakeShardsConfig(source="digits", out=str(out), fraction=0.05), progress=False)
    cfg = Config()
    cfg.model.arch, cfg.model.conditional = "dcgan", True
    cfg = check_data(cfg, str(out))
    assert cfg.model.num_classes == 10
    cfg.model.num_classes = 12
    with pytest.raises(UserError, match="model.num_classes=12 but the shards have 10 classes"):
        check_data(cfg, str(out))
    from trainer.services.plan import check_classes

    cfg.model.num_classes = 0
    with pytest.raises(UserError, match="needs class labels: these shards list no classes"):
        check_classes(cfg, {"classes": []})


def test_registered_conditional_generator_samples_by_class(tmp_path):
    """Registered with labels as the input's last column (the signature shows it); sampled by
    class from Python and the command line; an unconditional one refuses labels."""
    from trainer import sample
    from trainer.services import tracking
    from trainer.services.conclude import build_generator

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = Config()
    cfg.model.arch, cfg.model.latent_dim, cfg.model.g_width = "dcgan", 8, 8
    cfg.model.conditional, cfg.model.num_classes = True, 10
    run_id, _ = tracking.start_run(uri, "cond", "run-c", asdict(cfg))
    G = build_generator(cfg)
    with torch.no_grad():
        for m in G.modules():
            if hasattr(m, "gain"):
                m.gain.weight.uniform_(0.2, 2.0)
    version = tracking.register_generator(uri, run_id, G, 8, "cond", {}, num_classes=10)
    import mlflow

    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(f"models:/cond/{version}")
    assert info.signature.inputs.inputs[0].shape[-1] == 9 and info.metadata["num_classes"] == 10
    gen, latent = tracking.load_generator(uri, f"models:/cond/{version}")
    assert latent == 8 and gen.num_classes == 10
    z = torch.randn(4, 8)
    with torch.no_grad():
        expected = G.eval()(z, torch.full((4,), 3))
        torch.testing.assert_close(gen(z, torch.full((4,), 3)), expected, rtol=1e-4, atol=1e-5)
    rows = np.concatenate([z.numpy(), np.full((4, 1), 3, np.float32)], axis=1)  # no stablegan needed
    served = mlflow.pyfunc.load_model(f"models:/cond/{version}").predict(rows)
    np.testing.assert_allclose(served, expected.numpy(), rtol=1e-4, atol=1e-5)
    x = sample.sample(
        f"models:/cond/{version}", num=3, labels="3,7", tracking_uri=uri, out=tmp_path / "s.npz"
    )
    assert x.shape == (6, 1, 32, 32)
    saved = np.load(tmp_path / "s.npz")
    assert saved["labels"].tolist() == [3, 3, 3, 7, 7, 7]
    with pytest.raises(ValueError, match="knows classes 0..9"):
        sample.sample(f"models:/cond/{version}", num=1, labels="12", tracking_uri=uri)
    plain = Config()
    plain.model.g_width, plain.model.depth = 16, 1
    v2 = tracking.register_generator(uri, run_id, build_generator(plain), plain.model.latent_dim, "plain", {})
    with pytest.raises(ValueError, match="not a conditional generator"):
        sample.sample(f"models:/plain/{v2}", num=1, labels="1", tracking_uri=uri)
