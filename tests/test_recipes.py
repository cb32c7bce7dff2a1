"""The pieces the field's recipes need (issue: recipes at equal compute): each checked against a
hand computation, then trained a few steps through real DeepSpeed engines under fp32 and bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import Config, ConfigError, ModelConfig, OptimConfig, ParallelConfig, PenaltyConfig
from trainer.gan import losses, penalties, schedule
from trainer.gan.ema import EMA
from trainer.gan.models import Packed, build_pair
from trainer.gan.schedule import EMADecay
from trainer.gan.step import GANStep
from trainer.train.engines import Engine


def test_relativistic_loss_pairs_each_real_with_a_fake():
    real = torch.tensor([2.0, -1.0, 0.5])
    fake = torch.tensor([1.0, 0.0, 3.0])
    d_loss, g_loss = losses.get("relativistic")
    # D: softplus(-(D(x_i) - D(G(z_i)))); G: softplus(-(D(G(z_i)) - D(x_i))), means over pairs
    by_hand_d = sum(math.log1p(math.exp(-(r - f))) for r, f in zip(real.tolist(), fake.tolist())) / 3
    by_hand_g = sum(math.log1p(math.exp(-(f - r))) for r, f in zip(real.tolist(), fake.tolist())) / 3
    assert d_loss(real, fake).item() == pytest.approx(by_hand_d, rel=1e-6)
    assert g_loss(fake, real).item() == pytest.approx(by_hand_g, rel=1e-6)
    with pytest.raises(ValueError, match="pairs each fake with a real"):
        g_loss(fake)
    # G's gradient does not reach the reals' logits (they are D's, a constant to G)
    r, f = real.clone().requires_grad_(True), fake.clone().requires_grad_(True)
    g_loss(f, r).backward()
    assert r.grad is None and f.grad is not None


def test_r1r2_is_r1_plus_r2_with_one_gamma():
    # D(x) = w . x: its input gradient is w everywhere, so R1 = R2 = |w|^2
    w = torch.tensor([3.0, -4.0])

    def d_fn(x: torch.Tensor) -> torch.Tensor:
        return x @ w

    real, fake = torch.randn(5, 2), torch.randn(5, 2)
    assert penalties.r1(d_fn, real).item() == pytest.approx(25.0)
    assert penalties.r2(d_fn, fake).item() == pytest.approx(25.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_r1r2_step_adds_gamma_half_of_both(ds_dist, precision):
    """One D step of penalty=r1r2 through DeepSpeed: its penalty is R1 on the (augmented) reals
    plus R2 on the fakes, computed by hand on the same D, and the loss takes gamma / 2 of it."""
    cfg = _tiny_image_config(precision, penalty=PenaltyConfig(kind="r1r2", weight=0.5))
    step, g, d = _step(cfg)
    real = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    D32 = _fp32_copy(d.module)
    noise = torch.Generator().manual_seed(1)  # the fakes this step draws
    fake = g.module(torch.randn(8, cfg.model.latent_dim, generator=noise).to(g.dtype)).float()
    by_hand = penalties.r1(D32, real).item() + penalties.r2(D32, fake.detach()).item()
    out = step.d_step(real)
    tol = 1e-4 if precision == "fp32" else 5e-2
    assert out["penalty"].item() == pytest.approx(by_hand, rel=tol)
    assert step.reg_interval == 1 and step.penalty.weight == 0.5


def test_packing_concatenates_consecutive_samples_along_channels():
    torch.manual_seed(0)
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.flatten(1).sum(1)

    x = torch.randn(6, 3, 4, 4)
    out = Packed(Spy(), 2)(x)
    assert seen[0].shape == (3, 6, 4, 4)
    torch.testing.assert_close(seen[0][1], torch.cat([x[2], x[3]]))  # pack 1 = samples 2 and 3
    torch.testing.assert_close(out, torch.stack([x[2 * i : 2 * i + 2].sum() for i in range(3)]))
    with pytest.raises(ValueError, match="multiple of it"):
        Packed(Spy(), 4)(x)
    _, D = build_pair(ModelConfig(arch="dcgan", resolution=32, channels=3, d_width=8, pack=2))
    assert D(torch.randn(8, 3, 32, 32)).shape == (4,)
    _, D2 = build_pair(ModelConfig(arch="mlp", d_width=8, depth=1, pack=4))
    assert D2(torch.randn(8, 2)).shape == (2,)


def test_pack_is_checked_against_the_batch_and_conditioning():
    cfg = Config()
    cfg.model.pack, cfg.data.batch_size = 3, 64
    with pytest.raises(ConfigError, match="model.pack=3 must divide data.batch_size=64"):
        cfg.check()
    cfg.model.pack, cfg.model.mbstd_group = 4, 32
    with pytest.raises(ConfigError, match="mbstd_group=32"):
        cfg.check()
    cfg.model = ModelConfig(arch="dcgan", conditional=True, pack=2)
    with pytest.raises(ConfigError, match="model.pack=2 does not combine with model.conditional"):
        cfg.check()


def test_cosine_and_linear_schedules_by_hand():
    o = OptimConfig(lr_schedule="cosine", lr_final_scale=0.25, beta2=0.9, beta2_end=0.99)
    assert schedule.lr_scale(o, 0, 100) == pytest.approx(1.0)
    assert schedule.lr_scale(o, 50, 100) == pytest.approx(0.25 + 0.75 * 0.5)  # cos(pi/2) = 0
    assert schedule.lr_scale(o, 25, 100) == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule.lr_scale(o, 100, 100) == pytest.approx(0.25)
    assert schedule.beta2(o, 0, 100) == pytest.approx(0.9)
    assert schedule.beta2(o, 50, 100) == pytest.approx(0.945)
    assert schedule.beta2(o, 500, 100) == pytest.approx(0.99)  # held after the schedule
    o = OptimConfig(lr_schedule="cosine", schedule_steps=10)
    assert schedule.lr_scale(o, 10, 100) == 0.0 and schedule.lr_scale(o, 60, 100) == 0.0
    # linear to 0 over max_steps: the arithmetic the presets were tuned with, bit for bit
    o = OptimConfig(lr_schedule="linear")
    assert all(schedule.lr_scale(o, s, 12_000) == 1.0 - s / 12_000 for s in range(0, 12_000, 7))
    assert (
        schedule.lr_scale(OptimConfig(), 50, 100) == 1.0 and schedule.beta2(OptimConfig(), 50, 100) == 0.999
    )
    p = PenaltyConfig(weight=0.05, weight_end=0.005)
    assert schedule.penalty_scale(p, 0.05, OptimConfig(), 0, 100) == pytest.approx(1.0)
    assert schedule.penalty_scale(p, 0.05, OptimConfig(), 100, 100) == pytest.approx(0.1)
    assert schedule.penalty_scale(PenaltyConfig(), 1.0, OptimConfig(), 100, 100) == 1.0


def test_ema_half_life_in_images_with_rampup_by_hand():
    # StyleGAN2-ADA: beta = 0.5 ** (batch / ema_nimg), ema_nimg = min(ema_kimg * 1000, cur_nimg * rampup)
    fixed = EMADecay(decay=0.999)
    assert fixed.at(0) == pytest.approx(0.1) and fixed.at(10_000) == 0.999  # the ramped fixed decay
    half = EMADecay(decay=0.999, kimg=20.0, batch=64)
    assert half.at(0) == pytest.approx(0.5 ** (64 / 20_000))
    ramp = EMADecay(decay=0.999, kimg=20.0, rampup=0.05, batch=64)
    assert ramp.at(0) == 0.0  # no images seen: the average is G itself
    assert ramp.at(10) == pytest.approx(0.5 ** (64 / (10 * 64 * 0.05)))  # 0.25
    assert ramp.at(100_000) == pytest.approx(half.at(0))  # ramp over, the half-life rules
    module = torch.nn.Linear(2, 1)
    ema = EMA(module, ramp)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # decay 0: a copy
    torch.testing.assert_close(ema.module.weight, module.weight)


def test_penalty_weight_auto_is_stylegan2_adas_heuristic():
    assert PenaltyConfig(weight="auto").gamma(32, 64) == pytest.approx(0.0002 * 32**2 / 64)  # 0.0032
    assert PenaltyConfig(weight="auto").gamma(256, 64) == pytest.approx(0.2048)
    assert PenaltyConfig(weight=10).gamma(32, 64) == 10.0
    for bad in ("autoo", -1.0, True):
        with pytest.raises(ConfigError, match="penalty.weight"):
            PenaltyConfig(weight=bad).check()
    cfg = _tiny_image_config("fp32", penalty=PenaltyConfig(kind="r1", weight="auto"))
    cfg.trainer.num_workers = 2
    assert GANStep.gamma(cfg) == pytest.approx(0.0002 * 32**2 / 16)  # the global batch: 8 x 2


def test_beta1_zero_and_bad_schedule_values():
    OptimConfig(beta1=0.0).check()
    for kwargs, key in [
        ({"beta2_end": 1.0}, "optim.beta2_end"),
        ({"lr_final_scale": 2.0}, "optim.lr_final_scale"),
        ({"lr_schedule": "step"}, "optim.lr_schedule"),
    ]:
        with pytest.raises(ConfigError, match=key):
            OptimConfig(**kwargs).check()
    with pytest.raises(ConfigError, match="penalty.weight_end"):
        PenaltyConfig(weight_end=-1.0).check()


PIECES = {
    "relativistic": {"loss": "relativistic"},
    "r1r2": {"penalty": PenaltyConfig(kind="r1r2", weight=0.1)},
    "pack": {"pack": 2},
    "beta1_0": {"beta1": 0.0},
    "cosine": {"cosine": True},
    "ema_kimg": {"ema": True},
    "gamma_auto": {"penalty": PenaltyConfig(kind="r1", weight="auto")},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("piece", list(PIECES))
def test_each_piece_trains_through_engines(ds_dist, piece, precision):
    """A few D and G steps of a small DCGAN pair with the piece on: finite losses, both networks
    moved, the optimizers given the scheduled values."""
    opts = PIECES[piece]
    cfg = _tiny_image_config(precision, penalty=opts.get("penalty", PenaltyConfig(kind="r1", weight=1.0)))
    cfg.loss.kind = opts.get("loss", "nonsaturating")
    cfg.model.pack = opts.get("pack", 1)
    cfg.optim.beta1 = opts.get("beta1", 0.5)
    if opts.get("cosine"):
        cfg.optim.lr_schedule, cfg.optim.lr_final_scale, cfg.optim.beta2_end = "cosine", 0.25, 0.99
        cfg.penalty.weight_end = 0.1
    cfg.check()
    step, g, d = _step(cfg)
    ema = EMA(g.module, EMADecay(0.999, kimg=0.5 if opts.get("ema") else 0.0, rampup=0.05, batch=8))
    g0 = [p.detach().float().clone() for p in g.module.parameters()]
    d0 = [p.detach().float().clone() for p in d.module.parameters()]
    data = torch.Generator().manual_seed(2)
    cfg.trainer.max_steps = 3
    for t in range(3):
        step.set_hparams(*schedule.at_step(cfg, GANStep.gamma(cfg), t))
        real = torch.randn(8, 1, 32, 32, generator=data)
        out = {**step.d_step(real), **step.g_step(8, real)}
        ema.update(g.module)
        assert out["nonfinite"] == 0 and torch.isfinite(out["g_loss"]) and torch.isfinite(out["d_loss"])
    assert any(not torch.equal(a, b.float()) for a, b in zip(g0, g.module.parameters()))
    assert any(not torch.equal(a, b.float()) for a, b in zip(d0, d.module.parameters()))
    lr, (beta1, beta2) = g.ds.optimizer.param_groups[0]["lr"], g.ds.optimizer.param_groups[0]["betas"]
    assert beta1 == cfg.optim.beta1
    if opts.get("cosine"):  # step 2 of 3 on the cosine
        assert lr == pytest.approx(cfg.optim.g_lr * (0.25 + 0.75 * 0.5 * (1 + math.cos(2 * math.pi / 3))))
        assert beta2 == pytest.approx(0.99 + (0.999 - 0.99) * 0.5 * (1 + math.cos(2 * math.pi / 3)))
    if piece == "gamma_auto":
        assert step.penalty.weight == pytest.approx(0.0002 * 32**2 / 8)


def test_the_relativistic_g_step_scores_the_reals_without_touching_d(ds_dist):
    cfg = _tiny_image_config("fp32", penalty=PenaltyConfig(kind="none"))
    cfg.loss.kind = "relativistic"
    step, g, d = _step(cfg)
    with pytest.raises(ValueError, match="pairs fakes with reals"):
        step.g_step(8)
    real = torch.randn(8, 1, 32, 32)
    G0, D0 = _fp32_copy(g.module), _fp32_copy(d.module)  # as they score, before G's update
    noise = step.noise.get_state()
    out = step.g_step(8, real)
    assert all(p.grad is None for p in d.module.parameters())
    step.noise.set_state(noise)  # the same latents again, for the loss by hand
    with torch.no_grad():
        fake_logits, real_logits = D0(G0(step.latent(8))), D0(real)
    by_hand = F.softplus(real_logits - fake_logits).mean()
    assert out["g_loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def _tiny_image_config(precision: str, penalty: PenaltyConfig) -> Config:
    cfg = Config()
    cfg.parallel = ParallelConfig(precision=precision)
    cfg.model = ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8)
    cfg.penalty = penalty
    cfg.data.batch_size = 8
    return cfg


def _step(cfg: Config) -> tuple[GANStep, Engine, Engine]:
    torch.manual_seed(0)
    G, D = build_pair(cfg.model)
    o = cfg.optim
    g = Engine(G, o.g_lr, (o.beta1, o.beta2), cfg.parallel, cfg.data.batch_size)
    d = Engine(D, o.d_lr, (o.beta1, o.beta2), cfg.parallel, cfg.data.batch_size)
    return GANStep(g, d, cfg, torch.Generator().manual_seed(1)), g, d


def _fp32_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).float()


RECIPES = [
    "recipe_dcgan",
    "recipe_wgan_gp",
    "recipe_sngan",
    "recipe_pacgan2",
    "recipe_stylegan2",
    "recipe_r3gan",
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_trains_a_few_steps(ds_dist, recipe):
    """The recipe preset as a user composes it (stacked digits' shape set, as the shards would),
    built as the worker builds it, three steps with its schedules: finite, and G moved."""
    from trainer.services.compose import compose
    from trainer.train.worker import build_engines

    cfg = compose([f"experiment={recipe}", "model.resolution=32", "model.channels=3", "data.batch_size=8"])
    assert cfg.name == recipe
    g, d, ema = build_engines(cfg, torch.device("cpu"))
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(0))
    g0 = [p.detach().clone() for p in g.module.parameters()]
    o, gamma = cfg.optim, GANStep.gamma(cfg)
    cfg.trainer.max_steps = 3
    for t in range(3):
        step.set_hparams(*schedule.at_step(cfg, gamma, t))
        for _ in range(o.d_steps):
            real = torch.rand(8, 3, 32, 32) * 2 - 1
            out = step.d_step(real)
            assert out["nonfinite"] == 0
        out = step.g_step(8, real)
        ema.update(g.module)
        assert out["nonfinite"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.module.parameters()))
    sampled = ema.module(torch.randn(4, cfg.model.latent_dim))
    assert sampled.shape == (4, 3, 32, 32) and torch.isfinite(sampled).all()


def test_the_recipes_say_what_they_set():
    """Spot checks of each recipe's published settings, as composed."""
    from trainer.services.compose import compose

    def c(name: str) -> Config:
        return compose([f"experiment={name}", "model.resolution=32", "model.channels=3"])

    wgan = c("recipe_wgan_gp")
    assert (wgan.loss.kind, wgan.penalty.kind, wgan.penalty.weight, wgan.optim.d_steps) == (
        "wasserstein",
        "wgan_gp",
        10.0,
        5,
    )
    assert (wgan.optim.g_lr, wgan.optim.beta1, wgan.optim.beta2) == (1e-4, 0.0, 0.9)
    sn = c("recipe_sngan")
    assert (sn.model.spectral_norm, sn.loss.kind, sn.penalty.kind, sn.optim.d_steps) == (
        "d",
        "hinge",
        "none",
        5,
    )
    assert c("recipe_pacgan2").model.pack == 2
    sg2 = c("recipe_stylegan2")
    assert (sg2.penalty.interval, GANStep.gamma(sg2), sg2.optim.g_lr) == (16, pytest.approx(0.0032), 2.5e-3)
    assert (sg2.optim.beta1, sg2.optim.beta2, sg2.optim.ema_kimg, sg2.model.mbstd_group) == (
        0.0,
        0.99,
        20.0,
        4,
    )
    r3 = c("recipe_r3gan")
    assert (r3.loss.kind, r3.penalty.kind, r3.penalty.weight, r3.penalty.weight_end) == (
        "relativistic",
        "r1r2",
        0.05,
        0.005,
    )
    assert (r3.optim.lr_schedule, r3.optim.lr_final_scale, r3.optim.beta2, r3.optim.beta2_end) == (
        "cosine",
        0.25,
        0.9,
        0.99,
    )
    assert c("recipe_dcgan").optim.ema_decay == 0.0 and c("recipe_dcgan").penalty.kind == "none"


def test_the_comparison_counts_robust_runs_and_keeps_one_dataset_per_store(tmp_path):
    from experiments import recipes

    sweep = tmp_path / "tune" / "recipes-robust-r3gan"
    sweep.mkdir(parents=True)
    rows = [  # lr, seed, FD, modes, ended: a run converges when it completed with >= 990 modes
        ("0.0002", "1000", "40.0", "995", "completed"),
        ("0.0002", "1001", "50.0", "989", "completed"),
        ("0.0006", "1000", "30.0", "1000", "completed"),
        ("0.0006", "1001", "900.0", "120", "diverged"),
    ]
    lines = ["trial,optim.g_lr+optim.d_lr,trainer.seed,step,eval/fid,eval/modes,ended,lineage,node"]
    lines += [
        f"t{i},{lr},{seed},100,{fd},{modes},{ended},," for i, (lr, seed, fd, modes, ended) in enumerate(rows)
    ]
    (sweep / "trials.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "robust.json").write_text(f'{{"r3gan": "{sweep}"}}')
    row = recipes.robust_lines(tmp_path)[-1]
    # two of four converged; FD over the three completed runs: mean 40, sd 10
    assert row.startswith("| r3gan | 2 of 4 | 40 ± 10 (30, 50) |"), row
    assert row.endswith("| 0.0002: 1 of 2; 0.0006: 1 of 2 |"), row
    assert recipes.dataset(tmp_path, "digits") == "digits"  # a new store takes any dataset
    (tmp_path / "best_configs.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds runs on digits"):
        recipes.dataset(tmp_path, "stacked")


def test_the_small_data_store_is_scored_against_all_digits_beside_a_perfect_copier(tmp_path):
    """`--data digits180` trains on 180 digits and evaluates against all 1,797 (a copy of the 180
    cannot pass for the data); the table's reference rows are the data's own and a copier's."""
    from experiments import recipes

    recipes.dataset(tmp_path, "digits180")
    datasets = tmp_path / "datasets"
    assert recipes.data_args(tmp_path) == [
        f"data.urls={datasets / 'digits180-32px'}",
        f"eval.urls={datasets / 'digits-32px'}",
    ]
    data, copier = recipes.cached_data_row(tmp_path), recipes.copier_row(tmp_path)
    assert data["memorization"] < 0.2 and copier["memorization"] > 0.9  # each copy sits on a real image
    assert copier["fid"] < 10  # what FD alone would take for a good generator
    line = recipes.reference_line("copier", copier)
    assert line.startswith("| copier | | | | |  |  | ") and line.endswith(" | | |")  # no mode counts


def test_a_method_tuned_in_two_sweeps_takes_the_best_of_both(tmp_path):
    """A second grid (one point beyond the first's edge) adds a sweep; the method's best config
    is the best completed trial's over both, and the tuning table lists every point by lr."""
    from experiments import recipes

    def sweep(name: str, rows: list[tuple[str, str, str]]) -> None:
        root = tmp_path / "tune" / name
        (root / "experiment").mkdir(parents=True)
        (root / "experiment" / f"{name}.yaml").write_text("# best\n")
        lines = ["trial,optim.g_lr+optim.d_lr,step,eval/fid,ended,lineage,node"]
        lines += [f"t{i},{lr},200,{fd},{ended},," for i, (lr, fd, ended) in enumerate(rows)]
        (root / "trials.csv").write_text("\n".join(lines) + "\n")

    sweep("recipes-sngan-x1-3-9", [("0.0002", "699", "completed"), ("0.0018", "124", "completed")])
    best = tmp_path / "tune" / "recipes-sngan-x1-3-9" / "experiment" / "recipes-sngan-x1-3-9.yaml"
    assert recipes.best_of(tmp_path, "sngan") == str(best)
    sweep("recipes-sngan-x27", [("0.0054", "99.8", "completed"), ("0.0162", "20", "diverged")])
    sweep("recipes-sngan_other-x1", [("0.0001", "1", "completed")])  # another method's sweep
    best = tmp_path / "tune" / "recipes-sngan-x27" / "experiment" / "recipes-sngan-x27.yaml"
    assert recipes.best_of(tmp_path, "sngan") == str(best)  # 99.8 beats 124; a diverged 20 does not count
    (tmp_path / "best_configs.json").write_text(f'{{"sngan": "{best}"}}')
    row = recipes.tuning_lines(tmp_path)[-1]
    assert row == (
        "| sngan | 0.0002: 699.0 (completed); 0.0018: 124.0 (completed); "
        "0.0054: 99.8 (completed); 0.0162: 20.0 (diverged) |"
    ), row
