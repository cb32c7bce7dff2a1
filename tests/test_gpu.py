"""GPU-only correctness checks, marked `gpu`: skipped where no CUDA device exists (CI has
none); `benchmarks/gpu_run.sh checks` runs them on a lent card.

For bf16, bf16_autocast and fp16 (dynamic loss scaling) under ZeRO 0, 1 and 2: the R1 penalty
taken through a real DeepSpeed engine matches an fp32 reference on the same weights, its
gradient is applied, and 20 full GAN steps stay finite with no gradient left in D after the G step.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks.common import init_dist
from trainer.config import Config, ModelConfig, ParallelConfig
from trainer.gan import penalties
from trainer.gan.models import build_pair
from trainer.gan.step import GANStep
from trainer.train.engines import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_dist():
    """A one-process nccl group (DeepSpeed needs one), torn down after the module."""
    init_dist("cuda")
    yield
    torch.distributed.destroy_process_group()


def check(stage: int, precision: str) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    G, D = build_pair(
        ModelConfig(arch="dcgan", latent_dim=100, resolution=64, channels=3, g_width=32, d_width=32)
    )
    parallel = ParallelConfig(zero_stage=stage, precision=precision)
    d = Engine(D.to(dev), 2e-4, (0.5, 0.999), parallel, 16)
    g = Engine(G.to(dev), 2e-4, (0.5, 0.999), parallel, 16)
    x = torch.rand(16, 3, 64, 64, device=dev) * 2 - 1
    ref_D = copy.deepcopy(d.module).float()
    reference = penalties.r1(lambda t: ref_D(t), x).item()
    if precision == "fp16":
        r1 = penalties.r1(d.fp32_forward, x).item()  # what GANStep does under fp16
    else:
        xr = x.clone().requires_grad_(True)
        r1 = penalties.r1_from_logits(penalties.penalty_logits(d.eager, xr), xr).item()  # as GANStep
    cfg = Config()
    cfg.model.arch, cfg.model.latent_dim, cfg.parallel = "dcgan", 100, parallel
    step = GANStep(g, d, cfg, torch.Generator().manual_seed(1))
    finite, d_grads_after_g = True, 0
    for _ in range(20):
        m = step.d_step(x)
        m.update(step.g_step(16))
        d_grads_after_g += sum(p.grad is not None for p in d.module.parameters())
        # Grad norms are inf on the steps that fp16 dynamic loss scaling skips: not a failure.
        finite &= all(torch.isfinite(v).all().item() for k, v in m.items() if not k.endswith("grad_norm"))
    rel = abs(r1 - reference) / max(abs(reference), 1e-12)
    return {
        "stage": stage,
        "precision": precision,
        "r1_engine": r1,
        "r1_fp32_ref": reference,
        "rel_err": rel,
        "loss_scale": d.loss_scale,
        "finite_20_steps": finite,
        "d_grads_after_g": d_grads_after_g,
        "ok": rel < 0.05 and finite and d_grads_after_g == 0,
    }


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "bf16_autocast", "fp16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_r1_through_deepspeed_matches_fp32_on_a_gpu(gpu_dist, stage, precision):
    result = check(stage, precision)
    print(json.dumps(result))
    assert result["rel_err"] < 0.05, result
    assert result["finite_20_steps"], result
    assert result["d_grads_after_g"] == 0, result
