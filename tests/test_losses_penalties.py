"""Losses and gradient penalties: analytic values, gradcheck, and the seed's saturating bug."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.gan import losses, penalties
from trainer.gan.models.blocks import spectral_norm_all


def test_nonsaturating_matches_bce_and_fixes_the_seed_bug():
    real, fake = torch.randn(64), torch.randn(64)
    d = losses.nonsaturating_d(real, fake)
    ref = F.binary_cross_entropy_with_logits(real, torch.ones(64)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros(64)
    )
    assert torch.allclose(d, ref, atol=1e-6)
    # The seed trained G with BCE against zeros: its gradient pushes D(G(z)) *down* (toward "fake").
    logits = torch.tensor([-4.0], requires_grad=True)
    F.binary_cross_entropy_with_logits(logits, torch.zeros(1)).backward()
    assert logits.grad.item() > 0  # minimising it lowers the logit: G learns to look fake
    logits.grad = None
    losses.nonsaturating_g(logits).backward()
    assert logits.grad.item() < -0.9  # ours raises it, strongly when D rejects the fake


@pytest.mark.parametrize("kind", list(losses.LOSSES))
def test_losses_reward_separation(kind):
    d_loss, g_loss = losses.get(kind)
    good = d_loss(torch.full((8,), 3.0), torch.full((8,), -3.0))
    bad = d_loss(torch.full((8,), -3.0), torch.full((8,), 3.0))
    assert good < bad
    real = torch.zeros(8)  # D's logits of reals: paired losses (relativistic) use them, others ignore them
    assert g_loss(torch.full((8,), 3.0), real) < g_loss(torch.full((8,), -3.0), real)


def test_unknown_loss():
    with pytest.raises(ValueError, match="allowed: nonsaturating, hinge"):
        losses.get("bce")


def test_r1_linear_discriminator_is_norm_w_squared():
    w = torch.tensor([3.0, -4.0, 12.0])
    x = torch.randn(16, 3)
    assert torch.allclose(penalties.r1(lambda t: t @ w, x), torch.tensor(169.0))


def test_wgan_gp_linear_discriminator_known_value():
    w = torch.tensor([3.0, 4.0])  # |w| = 5 everywhere, so the penalty is (5 - 1)^2 = 16
    real, fake = torch.randn(32, 2), torch.randn(32, 2)
    assert torch.allclose(penalties.wgan_gp(lambda t: t @ w, real, fake), torch.tensor(16.0))


def test_r1_quadratic_discriminator_and_loss_scaling():
    # D(x) = 0.5 |x|^2 -> grad = x -> R1 = E|x|^2; the fp16 inner scale must cancel exactly.
    x = torch.randn(10, 4)
    d_fn = lambda t: 0.5 * t.square().sum(1)  # noqa: E731
    expected = x.square().sum(1).mean()
    assert torch.allclose(penalties.r1(d_fn, x), expected)
    assert torch.allclose(penalties.r1(d_fn, x, scale=65536.0), expected, rtol=1e-6)


def _mlp64():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()


def test_penalties_gradcheck_and_gradgradcheck():
    net = _mlp64()
    params = list(net.parameters())

    def r1_of_params(*ps):
        with torch.nn.utils.stateless._reparametrize_module(
            net, dict(zip([n for n, _ in net.named_parameters()], ps))
        ):
            return penalties.r1(lambda t: net(t).squeeze(1), x)

    x = torch.randn(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(r1_of_params, params)
    assert torch.autograd.gradgradcheck(r1_of_params, params)

    real, fake = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def gp_of_params(*ps):
        with torch.nn.utils.stateless._reparametrize_module(
            net, dict(zip([n for n, _ in net.named_parameters()], ps))
        ):
            return penalties.wgan_gp(
                lambda t: net(t).squeeze(1), real, fake, generator=torch.Generator().manual_seed(0)
            )

    assert torch.autograd.gradcheck(gp_of_params, params)


def test_r2_and_dragan_linear_discriminator_known_values():
    w = torch.tensor([3.0, 4.0])
    real, fake = torch.randn(32, 2), torch.randn(32, 2)
    assert torch.allclose(penalties.r2(lambda t: t @ w, fake), torch.tensor(25.0))
    # DRAGAN's perturbed points still see |grad| = 5: (5 - 1)^2
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(penalties.dragan(lambda t: t @ w, real, generator=gen), torch.tensor(16.0))


def test_dragan_probes_near_the_reals_only():
    seen = []

    def d_fn(t):
        seen.append(t.detach().clone())
        return t.square().sum(1)

    real = torch.randn(64, 2)
    penalties.dragan(d_fn, real, generator=torch.Generator().manual_seed(0))
    (x_hat,) = seen
    step = (x_hat - real).abs()
    assert (step <= 0.5 * real.std() + 1e-6).all() and step.sum() > 0


def test_dragan_replays_from_the_step_generator():
    """DRAGAN's noise is drawn on D's device from a seed of the caller's CPU generator: the same
    generator state gives the same penalty, and it advances the generator."""
    real = torch.randn(16, 3)
    d_fn = lambda t: t.square().sum(1)  # noqa: E731
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = penalties.dragan(d_fn, real, generator=a)
    assert torch.equal(first, penalties.dragan(d_fn, real, generator=b))
    assert not torch.equal(first, penalties.dragan(d_fn, real, generator=a))


@pytest.mark.parametrize("kind", ["r2", "dragan"])
def test_new_penalties_gradcheck_and_gradgradcheck(kind):
    net = _mlp64()
    names = [n for n, _ in net.named_parameters()]
    x = torch.randn(6, 3, dtype=torch.float64)

    def of_params(*ps):
        with torch.nn.utils.stateless._reparametrize_module(net, dict(zip(names, ps))):
            d_fn = lambda t: net(t).squeeze(1)  # noqa: E731
            if kind == "r2":
                return penalties.r2(d_fn, x)
            return penalties.dragan(d_fn, x, generator=torch.Generator().manual_seed(0))

    params = list(net.parameters())
    assert torch.autograd.gradcheck(of_params, params)
    assert torch.autograd.gradgradcheck(of_params, params)


def test_r1_from_logits_equals_separate_forward():
    net = _mlp64().float()
    x = torch.randn(8, 3)
    fused_x = x.clone().requires_grad_(True)
    logits = net(torch.cat([fused_x, torch.randn(8, 3)])).squeeze(1)
    fused = penalties.r1_from_logits(logits[:8], fused_x)
    separate = penalties.r1(lambda t: net(t).squeeze(1), x)
    assert torch.allclose(fused, separate, atol=1e-6)


@pytest.mark.parametrize(
    "size,kernel,stride,padding,bias",
    [(9, 4, 2, 1, True), (8, 4, 2, 1, False), (7, 3, 1, 1, True), (6, 1, 1, 0, True), (9, 3, 2, 0, False)],
)
def test_d_conv_gradcheck_and_gradgradcheck(size, kernel, stride, padding, bias):
    """The fast conv's own backward and double backward against finite differences (odd sizes
    need conv_transpose2d's output padding)."""
    from trainer.gan import ops

    torch.manual_seed(0)
    conv = ops.apply(torch.nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, bias=bias).double())
    assert ops.is_fast(conv)
    x = torch.randn(2, 2, size, size, dtype=torch.float64, requires_grad=True)
    args = (x, conv.weight, conv.bias) if bias else (x, conv.weight)

    def f(x, w, b=None):
        with ops.penalty_forward():
            return conv._conv_forward(x, w, b)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_d_activation_gradcheck_and_gradgradcheck(slope):
    """The fast (Leaky)ReLU's backward and double backward against finite differences."""
    from trainer.gan import ops

    module = ops.apply(torch.nn.ReLU() if slope == 0 else torch.nn.LeakyReLU(slope))
    assert ops.is_fast(module)

    def act(x):
        with ops.penalty_forward():
            return module(x)

    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_(True)  # away from the kink, where FD is undefined
    assert torch.autograd.gradcheck(act, (x,))
    assert torch.autograd.gradgradcheck(act, (x,))


@pytest.mark.parametrize("size", [8, 7])
def test_d_avg_pool_matches_f_avg_pool2d(size):
    """The fast 2x2 average pool under penalty_forward(): F.avg_pool2d's values and gradients
    (odd sizes drop a row and column), finite-difference checked to second order."""
    from trainer.gan import ops

    pool = ops.apply(torch.nn.AvgPool2d(2))
    assert ops.is_fast(pool) and not ops.is_fast(ops.apply(torch.nn.AvgPool2d(3)))  # 2x2 only

    def avg_pool2(x):
        with ops.penalty_forward():
            return pool(x)

    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, size // 2, size // 2, dtype=torch.float64)
    assert torch.equal(avg_pool2(x), F.avg_pool2d(x, 2))
    (ours,) = torch.autograd.grad(avg_pool2(x), x, g)
    (native,) = torch.autograd.grad(F.avg_pool2d(x, 2), x, g)
    assert torch.equal(ours, native)
    assert torch.autograd.gradcheck(avg_pool2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool2, (x,))


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "mlp"])
def test_penalty_graph_does_not_reach_d_forward(arch):
    """WGAN-GP's backward skips D's forward graph on the interpolates: under penalty_forward()
    the penalty does not depend on D's hidden activations at all; PyTorch's own ops (D's layers
    outside it) send it zeros there (what the cut saves: a backward over D on zero gradients)."""
    from trainer.gan import ops
    from trainer.gan.models import build_pair

    torch.manual_seed(0)
    if arch == "mlp":
        _, D = build_pair(ModelConfig(arch="mlp", latent_dim=2, g_width=8, d_width=8))
        x = torch.randn(4, 2, requires_grad=True)
    else:
        _, D = build_pair(
            ModelConfig(arch=arch, latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8)
        )
        x = torch.randn(4, 1, 32, 32, requires_grad=True)
    ops.apply(D, linear=arch != "mlp")  # as GANStep applies them
    hidden: list[torch.Tensor] = []
    first_conv_or_linear = next(m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    first_conv_or_linear.register_forward_hook(lambda m, i, o: hidden.append(o))

    def penalty_grad_on_hidden(cut: bool) -> torch.Tensor | None:
        hidden.clear()
        with ops.penalty_forward() if cut else contextlib.nullcontext():
            logits = D(x)
        grad = penalties.input_grad(logits, x)
        p = (grad.flatten(1).norm(dim=1) - 1).square().mean()
        return torch.autograd.grad(p, hidden[0], allow_unused=True)[0]

    assert penalty_grad_on_hidden(cut=True) is None
    native = penalty_grad_on_hidden(cut=False)  # outside penalty_forward: PyTorch's own ops
    assert native is not None and not native.any()


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("kind", ["r1", "wgan_gp"])
def test_d_conv_penalty_gradients_match_nn_conv2d(arch, kind):
    """The penalties' gradients on D's weights are the same with the fast ops (conv, activations,
    pooling) as with PyTorch's own layers and double backward, and the weight-gradient skip does
    not outlive the penalty."""
    from trainer.gan import ops
    from trainer.gan.models import build_pair
    from trainer.gan.ops.functions import STATE

    torch.manual_seed(0)
    _, D = build_pair(ModelConfig(arch=arch, latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8))
    D = ops.apply(D.double())
    real, fake = (
        torch.randn(4, 1, 32, 32, dtype=torch.float64),
        torch.randn(4, 1, 32, 32, dtype=torch.float64),
    )

    def grads() -> list[torch.Tensor]:
        D.zero_grad(set_to_none=True)
        if kind == "r1":
            p = penalties.r1(D, real)
        else:
            p = penalties.wgan_gp(D, real, fake, generator=torch.Generator().manual_seed(0))
        (p + D(real).mean()).backward()
        return [q.grad.clone() for q in D.parameters()]

    ours = grads()
    assert not STATE.no_weight_gradients
    assert any(ops.is_fast(m) and isinstance(m, torch.nn.Conv2d) for m in D.modules()), "D's convs are fast"
    ops.remove(D)  # PyTorch's own layers and double backward
    assert not any(type(m).__module__ == ops.__name__ for m in D.modules())
    # Spectral norm: the parametrized class is swapped and swapped back whole, parametrization kept.
    sn = spectral_norm_all(torch.nn.Conv2d(1, 1, 3))
    parametrized = type(sn)
    assert ops.is_fast(ops.apply(sn)) and isinstance(sn, parametrized) and hasattr(sn, "parametrizations")
    assert type(ops.remove(sn)) is parametrized
    native = grads()
    for a, b in zip(ours, native, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch,sn", [("dcgan", "none"), ("dcgan", "d"), ("resnet", "none"), ("resnet", "d")])
@pytest.mark.parametrize("kind", ["r1", "r2"])
def test_loss_from_deltas_is_the_loss_without_its_backward_pass(arch, sn, kind):
    """The fused R1 / R2 step's loss taken from the penalty's recorded pass (`record_outputs`,
    `loss_from_deltas`): the same value and weight gradients as the loss's own backward, while
    the penalized half's layers compute no activation gradient (none reaches its input)."""
    from trainer.gan import ops
    from trainer.gan.models import build_pair

    torch.manual_seed(0)
    _, D = build_pair(
        ModelConfig(
            arch=arch, latent_dim=8, resolution=32, channels=1, g_width=8, d_width=8, spectral_norm=sn
        )
    )
    D = ops.apply(D.double().eval())  # eval: spectral norm's power iteration would move between the passes
    assert ops.covers_every_weight(D) == []
    real, fake = (torch.randn(4, 1, 32, 32, dtype=torch.float64) for _ in range(2))
    d_loss = losses.get("nonsaturating")[0]  # dloss/dlogit is not a power of two: rounding differs

    def step(share: bool) -> tuple[float, list[torch.Tensor], torch.Tensor | None, int]:
        D.zero_grad(set_to_none=True)
        r, f = real.clone(), fake.clone()
        x = r if kind == "r1" else f
        x.requires_grad_(True)
        with ops.record_outputs(share) as records:
            rl = penalties.penalty_logits(D, r) if kind == "r1" else D(r)
            fl = D(f) if kind == "r1" else penalties.penalty_logits(D, f)
        pen = penalties.r1_from_logits(rl, r) if kind == "r1" else penalties.r2_from_logits(fl, f)
        if share:
            half = "real" if kind == "r1" else "fake"
            adv = penalties.loss_from_deltas(d_loss, rl, fl, half, records)
        else:
            adv = d_loss(rl, fl)
        (adv + 0.7 * pen).backward()
        return adv.item(), [p.grad.clone() for p in D.parameters()], x.grad, len(records)

    value, grads, x_grad, n = step(share=True)
    ref_value, ref_grads, ref_x_grad, ref_n = step(share=False)
    assert n == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in D.modules()) and ref_n == 0
    assert value == ref_value
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert x_grad is None and ref_x_grad is not None  # no backward through the penalized half's layers


def test_loss_from_deltas_needs_every_weight_recorded_and_per_sample_scores():
    from trainer.gan import ops
    from trainer.gan.models import build_pair

    mlp_d = ops.apply(
        build_pair(ModelConfig(arch="mlp", latent_dim=2, g_width=8, d_width=8))[1], linear=False
    )
    assert ops.covers_every_weight(mlp_d)  # PyTorch's nn.Linear left as it is: not covered
    mbstd_d = ops.apply(
        build_pair(
            ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, d_width=8, mbstd_group=4)
        )[1]
    )
    assert ops.covers_every_weight(mbstd_d) == []  # every weight is covered, but ...
    x = torch.randn(8, 1, 32, 32)
    assert not ops.scores_per_sample(mbstd_d, mbstd_d, x)  # minibatch stddev: a score depends on its group
    plain_d = ops.apply(
        build_pair(ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, d_width=8))[1]
    )
    assert ops.scores_per_sample(plain_d, plain_d, x)
    with pytest.raises(RuntimeError, match="input_grad inside record_outputs"):
        penalties.loss_from_deltas(losses.get("hinge")[0], torch.zeros(2), torch.zeros(2), "real", [])


def test_a_sample_mixing_op_is_caught_by_behaviour_and_leaves_d_untouched():
    """A parameter-free op that mixes samples passes any check by class or parameter: the
    behavioural check (`ops.scores_per_sample`) catches it, in training mode, and restores what
    its forwards touched (spectral norm's power-iteration vectors, the RNG)."""
    from trainer.gan import ops
    from trainer.gan.models import build_pair

    class BatchCentred(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(0, keepdim=True)

    torch.manual_seed(0)
    _, D = build_pair(
        ModelConfig(arch="dcgan", latent_dim=8, resolution=32, channels=1, d_width=8, spectral_norm="d")
    )
    x = torch.randn(8, 1, 32, 32)
    assert ops.scores_per_sample(D, D, x)
    D.body = torch.nn.Sequential(BatchCentred(), *D.body)
    ops.apply(D)
    assert ops.covers_every_weight(D) == []  # every weight is in a recording layer ...
    state = {k: v.clone() for k, v in D.state_dict().items()}
    rng = torch.get_rng_state()
    assert not ops.scores_per_sample(D, D, x)  # ... and still it mixes samples
    assert all(torch.equal(state[k], v) for k, v in D.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
