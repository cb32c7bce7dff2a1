"""One DeepSpeed engine per network: precision, ZeRO stage, clipping, checkpoint files.

The only module that imports deepspeed. Forwards run through `engine.module`, never the
engine's `__call__`: under ZeRO 0-2 (deepspeed 0.19) the engine's hooks break the double
backward that gradient penalties need, and the G step must not fire D's hooks at all.
Backward and step still go through the engine, so gradients are reduced across ranks,
partitioned (ZeRO 1/2), unscaled (fp16) and applied to the fp32 master weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from trainer.config import ParallelConfig

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
import deepspeed  # noqa: E402  (the accelerator must be chosen before import)

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

# The parameters' dtype per precision. bf16_autocast keeps fp32 weights and runs the forwards
# under torch.autocast: bf16 matmuls and convolutions, no master copy to flatten and sync.
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "bf16_autocast": torch.float32,
}


def ds_config(parallel: ParallelConfig, batch_size: int, grad_clip: float) -> dict:
    """The DeepSpeed config dict for one network."""
    cfg: dict = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": parallel.zero_stage},
        # We hand DeepSpeed a plain torch Adam: fused CUDA Adam does not exist on CPU.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": grad_clip,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
        # On by default, this timer synchronizes the device twice per step, serializing the
        # GPU pipeline. We time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
    }
    if parallel.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif parallel.precision == "bf16_autocast":
        # DeepSpeed's own autocast mode: fp32 parameters and optimizer, the plain (ZeRO 0) or
        # fp32 ZeRO path. Our forwards bypass the engine's __call__, so `Engine.__call__` opens
        # the autocast region itself; this section tells ZeRO which gradients it may reduce in
        # bf16. It matches exact classes when the engine is built, before `trainer.gan.ops` swaps D's.
        cfg["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [
                "torch.nn.Linear", "torch.nn.Conv2d", "torch.nn.ConvTranspose2d",
            ],
        }  # fmt: skip
    elif parallel.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 200}
    return cfg


def _deepspeed_safe_globals() -> list:
    """The plain DeepSpeed types its optimizer-state files hold (listed by
    torch.serialization.get_unsafe_globals_in_checkpoint): data, not code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path: str, map_location=None) -> dict:
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class Engine:
    """A network with its optimizer, wrapped in its own DeepSpeed engine."""

    def __init__(
        self,
        module: nn.Module,
        lr: float,
        betas: tuple[float, float],
        parallel: ParallelConfig,
        batch_size: int,
        grad_clip: float = 0.0,
    ):
        self.parallel = parallel
        # Fused Adam: one kernel over all tensors (CPU and CUDA) instead of a loop per tensor.
        optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=betas, fused=True)
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config(parallel, batch_size, grad_clip)
        )
        self.dtype = DTYPES[parallel.precision]
        self.autocast = parallel.precision == "bf16_autocast"
        self.device = self.ds.device
        # The compiled module shares the parameters; `eager` keeps the plain one for the
        # penalty's double backward, which compiled graphs do not support.
        self._fast = torch.compile(self.ds.module) if parallel.compile else self.ds.module
        # DeepSpeed reads its checkpoint files with weights_only=False, which would run any
        # pickled code a tampered checkpoint holds; tensors and plain containers are all ours has.
        self.ds.checkpoint_engine.load = _load_weights_only
        if parallel.zero_stage == 0 and self.ds.dp_world_size == 1:
            # A single replica: DeepSpeed's gradient all-reduce (flatten, a gloo call, copy
            # back, twice per GAN step) is an identity, and costly on a small model.
            self.ds.enable_backward_allreduce = False
        # DeepSpeed casts parameters for bf16/fp16 but not buffers; BatchNorm2d then refuses
        # fp32 running statistics next to bf16 weights.
        for buf in self.ds.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(self.dtype)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def __call__(self, x: torch.Tensor, eager: bool = False, y: torch.Tensor | None = None) -> torch.Tensor:
        """Forward through the bare module (compiled under `parallel.compile`, unless `eager`)
        in the engine's dtype (under bf16 autocast for `bf16_autocast`), with class labels `y`
        for a conditional model; outputs come back in fp32."""
        args = (x.to(self.dtype),) if y is None else (x.to(self.dtype), y.to(x.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return (self.ds.module if eager else self._fast)(*args).float()

    def eager(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The forward a gradient penalty differentiates twice: never compiled."""
        return self(x, eager=True, y=y)

    def fp32_forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Forward with fp32 views of the weights: the penalty path under fp16.

        fp16 activations cannot hold the penalty's inner gradient (scaled by the loss scale it
        overflows, unscaled it underflows), so under fp16 the penalty runs in fp32; its
        gradient still reaches the fp16 parameters through the casts.
        """
        state = {n: t.float() for n, t in self.ds.module.named_parameters()}
        state.update(
            {n: t.float() if t.is_floating_point() else t for n, t in self.ds.module.named_buffers()}
        )
        args = (x.float(),) if y is None else (x.float(), y.to(x.device))
        return torch.func.functional_call(self.ds.module, state, args).float()

    @property
    def loss_scale(self) -> float:
        """The current fp16 dynamic loss scale (1.0 in fp32/bf16), for logging."""
        if self.parallel.precision != "fp16":
            return 1.0
        opt = self.ds.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(
            getattr(opt, "loss_scaler", None), "cur_scale", None
        )
        return float(scale or 1.0)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> torch.Tensor:
        """Apply the update; return the global gradient norm before clipping (NaN if unknown)."""
        norm = None
        if self.parallel.zero_stage == 0 and self.dtype == torch.float32:
            # Plain optimizer path: DeepSpeed does not compute a norm here, grads are reduced already.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else None
            )
        self.ds.step()
        if norm is None:
            value = self.ds.get_global_grad_norm()
            norm = (
                value
                if isinstance(value, torch.Tensor)
                else torch.tensor(float("nan") if value is None else value)
            )
        return norm.detach().float()  # left on its device: no host sync in the step

    def set_hparams(self, lr: float, betas: tuple[float, float]) -> None:
        """Set lr/betas on every param group (lazy regularization and the guard rescale them)."""
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
            group["betas"] = betas

    def requires_grad_(self, flag: bool) -> None:
        for p in self.module.parameters():
            p.requires_grad_(flag)

    def save(self, directory: Path) -> None:
        """Write module and optimizer state (this rank's ZeRO partition) under `directory`."""
        self.ds.save_checkpoint(str(directory), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote; raises if it is missing."""
        path, _ = self.ds.load_checkpoint(str(directory), tag="state", load_optimizer_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
