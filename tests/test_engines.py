"""The penalty and the G step through real DeepSpeed engines, for each ZeRO stage and precision."""

from __future__ import annotations

import pytest
import torch

from trainer.config import Config, ModelConfig, ParallelConfig
from trainer.gan import ops, penalties
from trainer.gan.models import build_pair
from trainer.gan.step import GANStep
from trainer.train.engines import Engine


def _reference_r1(D: torch.nn.Module, x: torch.Tensor) -> float:
    D32 = D.float()
    return penalties.r1(lambda t: D32(t), x).item()


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16_autocast"])
def test_penalty_through_engine_matches_reference(ds_dist, stage, precision):
    torch.manual_seed(0)
    _, D = build_pair(ModelConfig(arch="dcgan", latent_dim=16, resolution=32, channels=1, d_width=8))
    x = torch.randn(4, 1, 32, 32)
    reference = _reference_r1(D, x)
    engine = Engine(D, 1e-3, (0.5, 0.99), ParallelConfig(zero_stage=stage, precision=precision), batch_size=4)
    # bf16 weights: compare with the fp32 penalty of the same (rounded) weights.
    if precision == "bf16":
        import copy

        reference = _reference_r1(copy.deepcopy(engine.module).float(), x)
    conv_dtypes: list[torch.dtype] = []  # what D's convolutions computed in
    for m in engine.module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: conv_dtypes.append(out.dtype))
    xr = x.clone().requires_grad_(True)
    r1 = penalties.r1_from_logits(penalties.penalty_logits(engine, xr), xr)
    assert r1.dtype == torch.float32
    assert r1.item() == pytest.approx(reference, rel=1e-4 if precision == "fp32" else 3e-2)
    # bf16_autocast: fp32 weights, bf16 convolutions (the penalty path's custom conv included).
    assert set(conv_dtypes) == {torch.float32 if precision == "fp32" else torch.bfloat16}
    assert {p.dtype for p in engine.module.parameters()} == {
        torch.bfloat16 if precision == "bf16" else torch.float32
    }
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    engine.backward(r1)
    norm = engine.step()
    after = [p.detach().float() for p in engine.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the penalty's gradient was applied
    assert torch.isfinite(norm) or (stage == 0 and precision == "fp32")


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "bf16"), (2, "fp32"), (0, "bf16_autocast")])
def test_g_step_leaves_no_gradient_in_d_and_d_unchanged(ds_dist, stage, precision):
    cfg = Config()
    cfg.parallel = ParallelConfig(zero_stage=stage, precision=precision)
    cfg.model.latent_dim = 8
    torch.manual_seed(0)
    G, D = build_pair(ModelConfig(arch="mlp", latent_dim=8, g_width=16, d_width=16, depth=2))
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 16)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 16)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
    d_before = [p.detach().clone() for p in d.module.parameters()]
    g_before = [p.detach().clone() for p in g.module.parameters()]
    metrics = step.g_step(16)
    assert all(p.grad is None for p in d.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(d_before, d.module.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g_before, g.module.parameters()))
    assert all(p.requires_grad for p in d.module.parameters())
    assert torch.isfinite(metrics["g_loss"])

    out = step.d_step(torch.randn(16, 2))
    assert out["penalty"] > 0 and torch.isfinite(out["d_loss"])
    assert all(p.grad is None for p in g.module.parameters())  # D step does not touch G


def test_lazy_regularization_schedule_and_rescaled_optimizer(ds_dist):
    cfg = Config()
    cfg.penalty.interval = 4
    cfg.model.latent_dim = 8
    G, D = build_pair(ModelConfig(arch="mlp", latent_dim=8, g_width=16, d_width=16, depth=1))
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(0))
    c = 4 / 5
    group = d.ds.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(cfg.optim.d_lr * c)
    assert group["betas"][1] == pytest.approx(cfg.optim.beta2**c)
    ran = [step.d_step(torch.randn(8, 2))["penalty"].item() > 0 for _ in range(8)]
    assert ran == [True, False, False, False, True, False, False, False]


@pytest.mark.parametrize("kind", ["r1", "r2", "wgan_gp", "dragan"])
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (1, "bf16_autocast")])
def test_every_penalty_trains_through_engines(ds_dist, kind, stage, precision, monkeypatch):
    from trainer.gan.ops import functions

    calls: list[int] = []  # D's own activation Function: only in forwards a penalty differentiates
    plain = functions._ReLUFn.apply
    monkeypatch.setattr(functions._ReLUFn, "apply", lambda *a: calls.append(1) or plain(*a))
    cfg = Config()
    cfg.parallel = ParallelConfig(zero_stage=stage, precision=precision)
    cfg.penalty.kind = kind
    cfg.model.latent_dim = 8
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(
            arch="mlp", latent_dim=8, g_width=16, d_width=16, depth=2, spectral_norm="d", mbstd_group=4
        )
    )
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 16)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 16)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
    before = [p.detach().float().clone() for p in d.module.parameters()]
    out = step.d_step(torch.randn(16, 2))
    assert out["penalty"].dtype == torch.float32 and out["penalty"] > 0
    assert out["nonfinite"] == 0
    assert any(not torch.equal(a, b.float()) for a, b in zip(before, d.module.parameters()))
    assert calls, "the penalty's forward should run D's layers for the double backward"
    calls.clear()
    assert torch.isfinite(step.g_step(16)["g_loss"])
    assert not calls, "the G step's D forward should run PyTorch's own ops"


@pytest.mark.parametrize(
    "kind,stage,precision",
    [("r1", 0, "fp32"), ("r2", 2, "fp32"), ("r1", 1, "bf16_autocast"), ("r1", 0, "bf16")],
)
def test_fused_step_takes_the_loss_gradient_from_the_penalty_pass(ds_dist, kind, stage, precision):
    """The fused R1 / R2 D step with `share_backward` (the penalized half's weight gradients from
    the penalty's recorded pass) trains D as the plain backward does, through DeepSpeed."""
    weights, metrics = {}, {}
    for share in (True, False):
        cfg = Config()
        cfg.parallel = ParallelConfig(zero_stage=stage, precision=precision)
        cfg.penalty.kind, cfg.model.latent_dim = kind, 8
        torch.manual_seed(0)
        G, D = build_pair(
            ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8)
        )
        g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
        d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 8)
        step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
        assert ops.covers_every_weight(d.module) == []  # DCGAN's D: every weight in a recorded layer
        step.share_backward = share
        data = torch.Generator().manual_seed(2)
        metrics[share] = [step.d_step(torch.randn(8, 1, 32, 32, generator=data)) for _ in range(3)]
        assert step.share_backward == share  # the shared path ran: no fallback
        weights[share] = [p.detach().float().clone() for p in d.module.parameters()]
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 1e-2}
    for ours, plain in zip(metrics[True], metrics[False]):
        for key in ("d_loss", "penalty", "d_grad_norm"):
            torch.testing.assert_close(ours[key].float(), plain[key].float(), **tol)
    for ours, plain in zip(weights[True], weights[False], strict=True):
        torch.testing.assert_close(ours, plain, **tol)


def test_fused_step_frees_what_it_recorded(ds_dist, monkeypatch):
    """Every layer output the shared backward recorded is freed with the step: a record and
    its output's autograd node point at each other, a cycle Python's collector cannot see
    (it leaked a step's activations per R1 step, 9 GB over a 2,000-step stacked-digits run)."""
    import contextlib
    import gc
    import weakref

    cfg = Config()
    cfg.penalty.kind, cfg.model.latent_dim = "r1", 8
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=3, g_width=8, d_width=8)
    )
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
    outputs: list[weakref.ref] = []
    real_record = ops.record_outputs

    @contextlib.contextmanager
    def spying(enabled: bool = True):
        with real_record(enabled) as records:
            yield records
        outputs.extend(weakref.ref(r["out"]) for r in records)  # the forward has run

    monkeypatch.setattr(ops, "record_outputs", spying)
    for _ in range(3):
        step.d_step(torch.randn(8, 3, 32, 32))
    assert step.share_backward and len(outputs) == 12  # 3 steps x D's four recorded layers
    gc.collect()
    assert [ref() is None for ref in outputs] == [True] * 12


def test_fused_step_falls_back_loudly_where_scores_mix_samples(ds_dist, caplog):
    """A D with minibatch stddev scores a sample with its group: the behavioural check sends the
    fused R1 step to the plain backward, with a warning, and training goes on."""
    cfg = Config()
    cfg.penalty.kind, cfg.model.latent_dim = "r1", 8
    torch.manual_seed(0)
    G, D = build_pair(
        ModelConfig(
            arch="dcgan", latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8, mbstd_group=4
        )
    )
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
    assert step.share_backward and ops.covers_every_weight(d.module) == []
    with caplog.at_level("WARNING", logger="stablegan.step"):
        out = step.d_step(torch.randn(8, 1, 32, 32))
    assert not step.share_backward and out["penalty"] > 0 and out["nonfinite"] == 0
    assert "depends on other samples" in caplog.text


def test_linear_lr_schedule_keeps_the_lazy_correction(ds_dist):
    cfg = Config()
    cfg.penalty.interval = 4
    G, D = build_pair(
        ModelConfig(arch="mlp", latent_dim=cfg.model.latent_dim, g_width=16, d_width=16, depth=1)
    )
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(0))
    step.set_lr_scale(0.25)
    assert d.ds.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.d_lr * 4 / 5 * 0.25)
    assert g.ds.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.g_lr * 0.25)


def _saved_checkpoint(tmp_path, step=10):
    from trainer.gan.ema import EMA
    from trainer.train import checkpoint

    cfg = Config()
    G, D = build_pair(
        ModelConfig(arch="mlp", latent_dim=cfg.model.latent_dim, g_width=16, d_width=16, depth=1)
    )
    g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 8)
    ema = EMA(g.module, 0.9)
    folder = tmp_path / f"checkpoint_{step:08d}"
    checkpoint.save(folder, 0, g, d, ema, step, torch.Generator(), {"positions": {}}, {"model": {}})
    return folder, (g, d, ema)


def test_checkpoints_are_checksummed_and_a_corrupt_one_falls_back(ds_dist, tmp_path):
    from trainer.train import checkpoint

    old, _ = _saved_checkpoint(tmp_path, 10)
    new, (g, d, ema) = _saved_checkpoint(tmp_path, 20)
    assert checkpoint.verify(new) == 20
    assert checkpoint.latest_valid(new) == new
    victim = next(p for p in sorted(new.rglob("*.pt")) if "D" in p.parts)
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match="does not match its sha256"):
        checkpoint.verify(new)
    assert checkpoint.latest_valid(new) == old  # the previous one, with a warning
    (old / "ema.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="ema.pt is missing"):
        checkpoint.verify(old)
    assert checkpoint.latest_valid(new) is None
    step, _, _ = checkpoint.load(_saved_checkpoint(tmp_path, 30)[0], 0, g, d, ema, torch.Generator())
    assert step == 30


def test_resume_takes_the_newest_complete_checkpoint_on_disk(ds_dist, tmp_path):
    """Ray registers checkpoints asynchronously: after a worker dies it may hand over an older
    one than the newest complete one on disk. Guard branches (-rK) are newer than any step of
    an earlier branch."""
    from trainer.train import checkpoint

    ray_latest, _ = _saved_checkpoint(tmp_path, 40)
    newer, _ = _saved_checkpoint(tmp_path, 80)
    assert checkpoint.latest_valid(ray_latest) == newer
    assert checkpoint.latest_valid(ray_latest, expected_ranks=2) is None  # one rank's manifest only
    branch = tmp_path / "checkpoint_00000060-r1"
    newer.rename(branch)  # as if the guard rolled back and saved step 60 on its first new branch
    _saved_checkpoint(tmp_path, 70)  # an abandoned step of branch 0, newer by number only
    assert checkpoint.latest_valid(ray_latest) == branch


def test_incompatible_checkpoint_config_names_the_keys():
    from dataclasses import asdict

    from trainer.train import checkpoint

    saved = asdict(Config())
    current = asdict(Config())
    checkpoint.check_compatible(saved, current)  # same: fine
    current["model"]["g_width"] = 128
    current["trainer"]["num_workers"] = 4
    with pytest.raises(
        checkpoint.CheckpointError, match=r"model.g_width=256 \(now 128\), trainer.num_workers=1"
    ):
        checkpoint.check_compatible(saved, current)
    # A checkpoint from before model.g_expert_prior existed had its default, uniform.
    del saved["model"]["g_expert_prior"]
    current = asdict(Config())
    checkpoint.check_compatible(saved, current)
    current["model"]["g_expert_prior"] = "learned"
    with pytest.raises(checkpoint.CheckpointError, match=r"model.g_expert_prior='uniform' \(now 'learned'\)"):
        checkpoint.check_compatible(saved, current)


@pytest.mark.parametrize(
    "was,now,ok",
    [
        ({"precision": "fp32"}, {"precision": "bf16_autocast"}, True),  # both fp32 optimizer files
        ({"precision": "bf16"}, {"precision": "fp32"}, False),
        ({"precision": "bf16"}, {"precision": "bf16_autocast"}, False),
        ({"zero_stage": 1}, {"zero_stage": 0}, False),
    ],
)
def test_resume_checks_the_optimizer_file_layout(ds_dist, tmp_path, was, now, ok):
    """What `check_compatible` lets through, DeepSpeed loads; what it refuses, it would fail on."""
    from dataclasses import asdict, replace

    from trainer.train import checkpoint

    def engine(parallel: ParallelConfig) -> Engine:
        torch.manual_seed(0)
        G, _ = build_pair(ModelConfig(arch="mlp", latent_dim=4, g_width=16, d_width=16, depth=1))
        return Engine(G, 1e-3, (0.5, 0.99), parallel, 8)

    saved_cfg, current_cfg = Config(), Config()
    saved_cfg.parallel, current_cfg.parallel = (
        replace(saved_cfg.parallel, **was),
        replace(current_cfg.parallel, **now),
    )
    first = engine(saved_cfg.parallel)
    first.backward(first(torch.randn(8, 4)).square().mean())
    first.step()
    first.save(tmp_path / "G")
    second = engine(current_cfg.parallel)
    if ok:
        checkpoint.check_compatible(asdict(saved_cfg), asdict(current_cfg))
        second.load(tmp_path / "G")
        assert all(torch.equal(a, b) for a, b in zip(first.module.parameters(), second.module.parameters()))
    else:
        key = "precision" if "precision" in now else "zero_stage"
        with pytest.raises(checkpoint.CheckpointError, match=rf"parallel\.{key}="):
            checkpoint.check_compatible(asdict(saved_cfg), asdict(current_cfg))
        with pytest.raises(Exception):  # noqa: B017 (DeepSpeed's own error varies: KeyError, FileNotFoundError, ...)
            second.load(tmp_path / "G")


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))  # what a tampered checkpoint could run on load


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "bf16"), (2, "bf16"), (2, "bf16_autocast")])
def test_engine_checkpoints_load_weights_only(ds_dist, tmp_path, stage, precision):
    """Every ZeRO stage's files load with weights_only=True; a pickled object is refused."""
    import pickle

    torch.manual_seed(0)
    G, _ = build_pair(ModelConfig(arch="mlp", latent_dim=4, g_width=16, d_width=16, depth=1))
    parallel = ParallelConfig(zero_stage=stage, precision=precision)
    engine = Engine(G, 1e-3, (0.5, 0.99), parallel, 8)
    engine.backward(engine(torch.randn(8, 4)).float().square().mean())
    engine.step()
    engine.save(tmp_path / "G")
    before = [p.detach().clone() for p in engine.module.parameters()]
    with torch.no_grad():
        for p in engine.module.parameters():
            p.zero_()
    engine.load(tmp_path / "G")
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))

    model_file = next((tmp_path / "G").rglob("mp_rank_00_model_states.pt"))
    state = torch.load(model_file, weights_only=True)
    state["evil"] = _Payload()
    torch.save(state, model_file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        engine.load(tmp_path / "G")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,interval,stage,sn",
    [("r1", 2, 0, "none"), ("wgan_gp", 1, 2, "none")],  # fused R1 + plain steps; separate penalty forward
)
def test_compiled_steps_match_eager(ds_dist, kind, interval, stage, sn):
    # parallel.compile runs every forward compiled except the penalized one (no double backward in
    # AOTAutograd): the same steps, the same weights up to float reassociation.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    weights = {}
    for compile_ in (False, True):
        cfg = Config()
        cfg.parallel = ParallelConfig(zero_stage=stage, precision="fp32", compile=compile_)
        cfg.penalty.kind, cfg.penalty.interval = kind, interval
        cfg.model.latent_dim = 8
        torch.manual_seed(0)
        G, D = build_pair(
            ModelConfig(arch="mlp", latent_dim=8, g_width=32, d_width=32, depth=2, spectral_norm=sn)
        )
        g = Engine(G, 1e-3, (0.5, 0.99), cfg.parallel, 32)
        d = Engine(D, 1e-3, (0.5, 0.99), cfg.parallel, 32)
        step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
        data = torch.Generator().manual_seed(2)
        penalties_seen = []
        for _ in range(4):
            penalties_seen.append(step.d_step(torch.randn(32, 2, generator=data))["penalty"].item())
            step.g_step(32)
        assert sum(p > 0 for p in penalties_seen) == 4 // interval
        if compile_:  # graphs were compiled, not silently run eagerly
            assert counters["stats"]["unique_graphs"] >= 2
        weights[compile_] = [p.detach().clone() for p in (*g.module.parameters(), *d.module.parameters())]
    for eager, compiled in zip(weights[False], weights[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
