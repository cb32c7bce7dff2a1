"""Stability signals: mode metrics, diversity, spectral norms, grad groups, summary, probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.sources import grid25_modes, ring8_modes
from trainer.config import ModelConfig
from trainer.eval.metrics import mode_metrics
from trainer.gan import losses
from trainer.gan.models import MinibatchStd, build_pair
from trainer.train import plots
from trainer.train import probe as stability
from trainer.train.meter import Meter


def test_mode_metrics_published_definitions():
    modes = grid25_modes()
    rng = np.random.default_rng(0)
    perfect = np.repeat(modes, 100, axis=0) + 0.01 * rng.standard_normal((2500, 2))
    m = mode_metrics(perfect, modes, 0.05)
    assert m["modes_covered"] == 25.0 and m["high_quality"] == 1.0
    assert m["reverse_kl"] == pytest.approx(0.0, abs=1e-12)
    assert m["spread"] == pytest.approx(0.2, rel=0.05)  # the samples' std 0.01 over sigma 0.05
    collapsed = np.tile(modes[:1], (2500, 1))
    m = mode_metrics(collapsed, modes, 0.05)
    assert m["modes_covered"] == 1 and m["reverse_kl"] == pytest.approx(math.log(25))
    # Half the samples far from every mode: half high quality; a 3-sigma miss does not count.
    off = perfect.copy()
    off[::2] += 0.5
    m = mode_metrics(off, modes, 0.05)
    assert m["high_quality"] == pytest.approx(0.5) and m["modes_covered"] == 25
    two = np.concatenate([np.tile(ring8_modes()[:1], (300, 1)), np.tile(ring8_modes()[1:2], (100, 1))])
    kl = 0.75 * math.log(0.75 * 8) + 0.25 * math.log(0.25 * 8)
    assert mode_metrics(two, ring8_modes(), 0.01)["reverse_kl"] == pytest.approx(kl)


def test_diversity_and_near_duplicates():
    real = torch.randn(64, 1, 8, 8)
    assert stability.diversity(real.clone(), real)["diversity"] == pytest.approx(1.0)
    collapsed = real[:1].repeat(64, 1, 1, 1) + 1e-3 * torch.randn(64, 1, 8, 8)
    d = stability.diversity(collapsed, real)
    assert d["diversity"] < 0.01
    half = torch.cat([real[:32], real[:32] + 1e-4])
    assert stability.diversity(half)["near_duplicates"] == 1.0
    assert stability.diversity(real)["near_duplicates"] == 0.0


def test_spectral_monitor_matches_the_largest_singular_value():
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8)
    )
    mon = stability.SpectralMonitor(D, iters=1, warmup=100)
    values = mon()
    assert set(values) == {"body.0", "body.2", "body.4", "head"}
    for name, m in D.named_modules():
        if name in values:
            exact = torch.linalg.matrix_norm(m.weight.detach().reshape(m.weight.shape[0], -1), ord=2).item()
            assert values[name] == pytest.approx(exact, rel=1e-3)


def test_spectral_monitor_reads_an_experts_layer_as_k_matrices():
    torch.manual_seed(0)
    G, _ = build_pair(ModelConfig(arch="mlp", latent_dim=3, g_width=8, d_width=8, depth=2, g_experts=6))
    values = stability.SpectralMonitor(G, iters=1, warmup=200)()
    assert set(values) == {"layers.0", "layers.1", "layers.2"}
    for i, layer in enumerate(G.layers):
        w = layer.weight.detach()
        exact = max(torch.linalg.matrix_norm(w[k], ord=2).item() for k in range(6))
        assert values[f"layers.{i}"] == pytest.approx(exact, rel=1e-3)


def test_group_grad_norms_leave_grads_alone_and_add_up():
    torch.manual_seed(0)
    _, D = build_pair(ModelConfig(arch="mlp", latent_dim=4, d_width=16, depth=2))
    x = torch.randn(32, 2)
    loss = D(x).square().mean()
    norms = stability.group_grad_norms(D, loss)
    assert all(p.grad is None for p in D.parameters())
    full = torch.autograd.grad(D(x).square().mean(), list(D.parameters()))
    assert norms["total"] == pytest.approx(torch.cat([g.flatten() for g in full]).norm().item(), rel=1e-5)
    assert set(norms) == {"net.0", "net.2", "head", "total"}


def test_minibatch_std_groups_never_mix_reals_and_fakes():
    layer = MinibatchStd(4)
    real, fake = torch.zeros(8, 3), torch.randn(8, 3)
    out = layer(torch.cat([real, fake]))
    assert torch.all(out[:8, -1] < 1e-3)  # identical reals: std 0 in their groups only
    assert torch.all(out[8:, -1] > 0.1)
    odd = layer(torch.randn(6, 3))  # 6 is not a multiple of 4: per-sample, std 0
    assert odd.shape == (6, 4) and torch.all(odd[:, -1] < 1e-3)


def test_meter_sums_counts_and_averages_the_rest():
    m = Meter()
    m.add({"nonfinite": torch.tensor(1.0), "d_loss": torch.tensor(1.0)})
    m.add({"nonfinite": torch.tensor(2.0), "d_loss": torch.tensor(3.0)})
    assert m.reduce() == {"d_loss": 2.0, "nonfinite": 3.0}


def test_ew_stats_z_score_flags_a_spike():
    s = stability.EWStats(alpha=0.1)
    rng = np.random.default_rng(0)
    zs = [s.update(1.0 + 0.01 * rng.standard_normal()) for _ in range(50)]
    assert max(abs(z) for z in zs) < 5
    assert s.update(2.0) > 20
    assert s.update(float("nan")) == float("inf")


def test_summary_names_divergence_and_the_first_signal():
    steps = list(range(100, 2100, 100))
    stable = {
        "d_loss": [(s, 1.2 + 0.01 * (s % 300 == 0)) for s in steps],
        "nonfinite": [(s, 0.0) for s in steps],
        "modes_covered": [(s, min(25.0, s / 40)) for s in steps],
    }
    summary = stability.summarize(stable)
    assert summary["diverged"] is False and summary["diverged_at"] is None
    # The gradient norm explodes at 1200, then losses go NaN at 1400 and coverage collapses.
    broken = {
        "g_grad_norm": [
            (s, 2.0 + 0.01 * (s % 200 == 0) if s < 1200 else 2.0 * 10 ** ((s - 1100) / 100)) for s in steps
        ],
        "nonfinite": [(s, 0.0 if s < 1400 else 3.0) for s in steps],
        "modes_covered": [(s, 25.0 if s < 1500 else 2.0) for s in steps],
    }
    summary = stability.summarize(broken)
    assert summary["diverged"] is True and summary["diverged_at"] == 1400
    assert summary["first_signal"] == "g_grad_norm" and summary["first_moves"]["g_grad_norm"] == 1200
    assert set(summary["reasons"]) == {"nonfinite", "modes_covered"}
    png = plots.report_png(broken, summary, "test")
    assert png[:4] == b"\x89PNG"


def test_probe_reports_signals_and_leaves_buffers_alone():
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(
            arch="resnet", latent_dim=16, resolution=32, channels=1, g_width=16, d_width=16, spectral_norm="d"
        )
    )
    buffers = [b.clone() for m in (G, D) for b in m.buffers()]
    d_loss, g_loss = losses.get("hinge")
    probe = stability.Probe(G, D, lambda: G, 16, d_loss, g_loss, num_samples=32)
    out = probe(torch.randn(32, 1, 32, 32), {"d_loss": 1.0, "g_loss": 0.5, "d_real": 1.0, "d_fake": -1.0})
    assert out["d_gap"] == 2.0
    assert {"sn/D/max", "sn/G/max", "grad/D/total", "grad/G/total", "diversity", "near_duplicates"} <= set(
        out
    )
    assert out["sn/D/max"] == pytest.approx(1.0, abs=0.05)  # spectral norm on D holds every layer at ~1
    assert all(torch.equal(a, b) for a, b in zip(buffers, (b for m in (G, D) for b in m.buffers())))
    assert all(p.grad is None for m in (G, D) for p in m.parameters())
