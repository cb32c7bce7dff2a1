"""Models (shapes, channels from data) and the EMA generator."""

from __future__ import annotations

import contextlib

import pytest
import torch

from trainer.config import ModelConfig
from trainer.gan.ema import EMA
from trainer.gan.models import build_pair


@pytest.mark.parametrize("resolution,channels", [(32, 1), (32, 3), (64, 1), (64, 3)])
def test_dcgan_shapes_follow_the_data(resolution, channels):
    G, D = build_pair(
        ModelConfig(
            arch="dcgan", latent_dim=100, resolution=resolution, channels=channels, g_width=16, d_width=16
        )
    )
    x = G(torch.randn(3, 100))
    assert x.shape == (3, channels, resolution, resolution)
    assert x.abs().max() <= 1
    assert D(x).shape == (3,)
    with pytest.raises(AssertionError, match="D expects"):
        D(torch.randn(3, 4 - channels if channels == 3 else 3, resolution, resolution))


def test_mlp_pair_and_unknown_arch():
    G, D = build_pair(ModelConfig(arch="mlp", latent_dim=8, g_width=32, d_width=32, depth=2))
    assert G(torch.randn(5, 8)).shape == (5, 2) and D(torch.randn(5, 2)).shape == (5,)
    with pytest.raises(ValueError, match="allowed: mlp, dcgan"):
        build_pair(ModelConfig(arch="vae", latent_dim=8))


def test_experts_generator_keeps_its_experts_apart():
    """z[:, 0] picks one of k equally likely experts; a sample's gradient reaches only its own
    expert's weights (no shared weights: no path between two experts' outputs)."""
    from trainer.gan.models.mlp import MLPExpertsGenerator, expert_index

    torch.manual_seed(0)
    G, _ = build_pair(ModelConfig(arch="mlp", latent_dim=3, g_width=8, d_width=8, depth=2, g_experts=5))
    assert isinstance(G, MLPExpertsGenerator) and G.out_shape == (2,)
    z = torch.randn(4000, 3)
    counts = torch.bincount(expert_index(z[:, 0], 5), minlength=5)
    assert counts.min() > 700 and counts.max() < 900  # 800 each in expectation
    one = torch.tensor([[0.0, 0.3, -0.2]])  # z0 = 0: the middle expert, index 2
    G(one).sum().backward()
    touched = [k for k in range(5) if any(layer.weight.grad[k].abs().sum() > 0 for layer in G.layers)]
    assert touched == [2]
    # The same point from the same expert whatever the other samples in the batch.
    assert torch.allclose(G(torch.cat([one, torch.randn(7, 3)]))[0], G(one)[0])
    # Grouped by expert (training) and gathered per sample (export, compile): the same maps,
    # the same gradients.
    grouped = G(z[:64])
    gathered = G._gathered(z[:64, 1:], expert_index(z[:64, 0], 5))
    assert torch.allclose(grouped, gathered, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), list(G.parameters())) for out in (grouped, gathered)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    # torch.export (how MLflow stores generators) takes it with a free batch size.
    ep = torch.export.export(G, (z[:4],), dynamic_shapes={"z": {0: torch.export.Dim("batch")}})
    assert torch.allclose(ep.module()(z[:9]), G(z[:9]), atol=1e-6)
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        build_pair(ModelConfig(arch="mlp", latent_dim=1, g_experts=3))
    with pytest.raises(ValueError, match="g_experts is for the mlp pair"):
        build_pair(ModelConfig(arch="dcgan", latent_dim=8, g_experts=3))


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge", "wasserstein", "lsgan"])
def test_learned_expert_prior_picks_by_its_weights_and_learns_from_g_loss(kind):
    """model.g_expert_prior=learned: z[:, 0] is read against the prior's CDF; G's loss gains a
    zero-valued score-function term whose gradient moves mass to experts D scores better."""
    from trainer.gan import losses
    from trainer.gan.models.mlp import expert_index

    torch.manual_seed(0)
    G, _ = build_pair(
        ModelConfig(
            arch="mlp", latent_dim=3, g_width=8, d_width=8, depth=2, g_experts=4, g_expert_prior="learned"
        )
    )
    z = torch.randn(20000, 3)
    assert (G.choose(z[:, 0]) == expert_index(z[:, 0], 4)).float().mean() > 0.999  # zero logits: uniform
    with torch.no_grad():
        G.prior_logits.copy_(torch.tensor([0.7, 0.1, 0.1, 0.1]).log())
    share = torch.bincount(G.choose(z[:, 0]), minlength=4) / len(z)
    assert abs(share[0] - 0.7) < 0.02 and (share[1:] - 0.1).abs().max() < 0.015
    with torch.no_grad():
        G.prior_logits.zero_()
    idx = G.choose(z[:512, 0])
    fake_logits = torch.where(idx == 3, 2.0, -1.0)  # D scores expert 3's samples as more real
    g_loss = losses.get(kind)[1]
    total = losses.with_learned_prior(losses.G_TERMS[kind], fake_logits, G.log_prior(z[:512]))
    assert torch.equal(total, g_loss(fake_logits))  # the per-sample terms average to G's loss
    total.backward()
    assert G.prior_logits.grad.argmin() == 3 and (G.prior_logits.grad[:3] > 0).all()
    # torch.export (MLflow's pt2 format) takes the prior's searchsorted too.
    with torch.no_grad():
        G.prior_logits.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    ep = torch.export.export(G, (z[:4],), dynamic_shapes={"z": {0: torch.export.Dim("batch")}})
    assert torch.allclose(ep.module()(z[:9]), G(z[:9]), atol=1e-6)
    uniform, _ = build_pair(ModelConfig(arch="mlp", latent_dim=3, g_width=8, d_width=8, depth=2, g_experts=4))
    with pytest.raises(ValueError, match="learned_prior=True"):
        uniform.log_prior(z[:4])


def test_ema_tracks_with_ramp_up_and_round_trips():
    G, _ = build_pair(ModelConfig(arch="mlp", latent_dim=4, g_width=8, d_width=8, depth=1))
    ema = EMA(G, decay=0.99)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early on, follow G closely
    target = [torch.full_like(p, 1.0) for p in G.parameters()]
    with torch.no_grad():
        for p, t in zip(G.parameters(), target):
            p.copy_(t)
    for _ in range(2000):
        ema.update(G)
    assert ema.current_decay() == pytest.approx(0.99)
    assert all(torch.allclose(e, t, atol=1e-4) for e, t in zip(ema.module.parameters(), target))
    fresh = EMA(build_pair(ModelConfig(arch="mlp", latent_dim=4, g_width=8, d_width=8, depth=1))[0], 0.99)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.num_updates == 2000
    assert all(torch.equal(a, b) for a, b in zip(fresh.module.parameters(), ema.module.parameters()))
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("penalty_forward", [False, True])
def test_d_compiles_to_one_graph_with_eager_gradients(penalty_forward):
    """parallel.compile runs D's unpenalized forwards compiled (PyTorch's ops in D's layers);
    under ops.penalty_forward() D's own autograd Functions must trace without graph breaks
    too, and both give the eager gradients."""
    from torch._dynamo.utils import counters

    from trainer.gan import ops

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    _, D = build_pair(
        ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8)
    )
    ops.apply(D)
    x = torch.randn(4, 1, 32, 32)
    D(x).sum().backward()
    eager = [p.grad.clone() for p in D.parameters()]
    D.zero_grad(set_to_none=True)
    with ops.penalty_forward() if penalty_forward else contextlib.nullcontext():
        torch.compile(D)(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for a, b in zip(eager, [p.grad for p in D.parameters()], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
