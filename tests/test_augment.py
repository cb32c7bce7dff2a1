"""D's input augmentation (trainer/gan/augment.py): DiffAugment's transforms, ADA's controller,
and where GANStep applies them (what D sees in both phases, never G's samples)."""

from __future__ import annotations

import pytest
import torch

from trainer.config import Config, ConfigError, ModelConfig
from trainer.gan import augment
from trainer.gan.augment import Augment
from trainer.gan.models import build_pair
from trainer.gan.step import GANStep
from trainer.train.engines import Engine


def _images(n: int = 16, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_p_zero_is_the_identity_and_p_one_changes_every_image():
    x = _images()
    assert Augment(("color", "translation", "cutout"), 0.0, torch.Generator())(x) is x
    y = Augment(("color",), 1.0, torch.Generator().manual_seed(1))(x)
    assert y.shape == x.shape and ((y - x).abs().flatten(1).amax(1) > 1e-3).all()


def test_translation_shifts_by_at_most_an_eighth_with_zeros_shifted_in():
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    y = augment.translation(x, torch.Generator().manual_seed(0))
    where = torch.stack([(img[0] == 1).nonzero()[0] for img in y])  # each image keeps its one pixel
    shift = (where - 8).abs()
    assert shift.max() == 2 and len({tuple(s) for s in where.tolist()}) > 10  # up to 16/8 px, varied
    assert y.sum() == 64  # nothing else appears: zeros came in from the border


def test_cutout_zeros_a_square_of_half_the_side_at_most():
    x = torch.ones(64, 1, 16, 16)
    y = augment.cutout(x, torch.Generator().manual_seed(0))
    zeros = (y == 0).flatten(1).sum(1)
    assert zeros.max() == 64 and zeros.min() > 0  # an 8x8 square, clipped at the border
    assert set(y.unique().tolist()) == {0.0, 1.0}


def test_probability_applies_per_sample():
    x = _images(n=400, c=1)
    y = Augment(("cutout",), 0.3, torch.Generator().manual_seed(0))(x)
    changed = (y != x).flatten(1).any(1).float().mean().item()
    assert 0.2 < changed < 0.4


@pytest.mark.parametrize("name", ["color", "translation", "cutout"])
def test_each_transform_passes_the_gradient_to_the_image(name):
    x = _images(n=4).requires_grad_(True)
    y = augment.TRANSFORMS[name](x, torch.Generator().manual_seed(0))
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ada_moves_p_toward_the_target_within_zero_and_one():
    a = Augment(("color",), 0.0, torch.Generator())
    assert a.adjust(0.9, 0.6, 25_000, 100_000) == pytest.approx(0.25)  # D sure of the reals: more
    assert a.adjust(0.2, 0.6, 10_000, 100_000) == pytest.approx(0.15)  # D unsure: less
    assert a.adjust(0.2, 0.6, 1_000_000, 100_000) == 0.0
    assert a.adjust(1.0, 0.6, 1_000_000, 100_000) == 1.0


@pytest.mark.parametrize(
    "key,value,fix",
    [
        ("policy", "colour", "comma-separated list of color"),
        ("p", 1.5, "[0, 1]"),
        ("kind", "adaptive", "ada"),
    ],
)
def test_bad_augment_config_names_the_key_and_the_fix(key, value, fix):
    cfg = Config()
    setattr(cfg.augment, key, value)
    with pytest.raises(ConfigError, match=f"augment.{key}=.*{fix}".replace("[", r"\[").replace("]", r"\]")):
        cfg.check()


def test_augmenting_points_is_a_config_error():
    cfg = Config()
    cfg.augment.kind = "ada"
    with pytest.raises(ConfigError, match="augment=ada transforms images.*use augment=none"):
        cfg.check()


class _Seen(torch.nn.Module):
    """Wraps D and keeps every batch it scored."""

    def __init__(self, D: torch.nn.Module):
        super().__init__()
        self.D, self.seen = D, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.D(x)


def _cut(batch: torch.Tensor) -> bool:
    """Every image has exact zeros: cutout ran (neither random reals nor tanh make exact zeros)."""
    return bool(((batch == 0).flatten(1).sum(1) > 0).all())


@pytest.mark.parametrize("kind", ["none", "diffaugment"])
def test_gan_step_augments_what_d_sees_in_both_phases_and_never_samples(ds_dist, kind):
    cfg = Config()
    cfg.penalty.kind, cfg.model.latent_dim = "r1", 8
    cfg.augment.kind, cfg.augment.policy = kind, "translation,cutout"
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8)
    )
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    d = Engine(_Seen(D), 1e-3, (0.5, 0.99), cfg.parallel, 8)
    cfg.penalty.fast_ops = "off"
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
    real = _images(n=8, c=1, size=32)
    out = step.d_step(real)  # R1 is due: reals and fakes go through D separately
    assert out["penalty"] > 0 and -1 <= out["d_sign_real"] <= 1
    seen_real, seen_fake = d.module.seen
    assert torch.equal(seen_real, real) == (kind == "none")
    assert _cut(seen_real) == _cut(seen_fake) == (kind == "diffaugment")
    before = [p.detach().clone() for p in G.parameters()]
    step.g_step(8)
    assert _cut(d.module.seen[-1]) == (kind == "diffaugment")
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, G.parameters()))  # G learned
    with torch.no_grad():
        assert not _cut(g.module(step.latent(8)))  # G's own output is never augmented
