"""Cheap in-step metric recording, reduced across ranks once per logging interval."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Meter:
    """Accumulates detached scalar tensors; `reduce()` is the only sync point (one all-reduce)."""

    def __init__(self, sum_keys: tuple[str, ...] = ("nonfinite",)) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.sum_keys = set(sum_keys)  # reported as totals over steps and ranks, not means

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()  # stays on its device until reduce(): no per-step sync
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._counts[k] = self._counts.get(k, 0) + 1

    def clear(self) -> None:
        """Drop what was accumulated (local, not collective)."""
        self._sums.clear()
        self._counts.clear()

    def reduce(self) -> dict[str, float]:
        """Means over steps and ranks (totals for `sum_keys`); clears the meter. Collective."""
        keys = sorted(self._sums)
        if not keys:
            return {}
        means = torch.stack(
            [(self._sums[k] / (1 if k in self.sum_keys else self._counts[k])).cpu() for k in keys]
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)  # gloo CPU tensor; NaN stays NaN, which is what we want to see
            mean_rows = torch.tensor([k not in self.sum_keys for k in keys])
            means[mean_rows] /= dist.get_world_size()
        self.clear()
        return dict(zip(keys, means.tolist()))


@torch.no_grad()
def replica_drift(*modules: torch.nn.Module) -> float:
    """Largest difference between ranks of a per-parameter fingerprint (0.0 = identical).

    Data parallelism must keep G and D bitwise equal on every rank; a nonzero value means a
    rank diverged (a missed all-reduce, a rank-dependent code path). Collective.
    """
    fingerprint = torch.stack(
        [
            p.detach().double().sum() + p.detach().double().square().sum()
            for m in modules
            for p in m.parameters()
        ]
    ).cpu()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    high, low = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())
