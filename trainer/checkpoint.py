"""The whole training state as files: both engines (with optimizer states), EMA, counters,
RNG, data position per rank, and the resolved config. No pickled modules: our own files are
state dicts loaded with `weights_only=True`.

Layout of one checkpoint directory (every rank writes its own files into it; Ray Train merges
the ranks' uploads into one checkpoint):

    G/state/...  D/state/...        DeepSpeed module + optimizer (ZeRO partitions per rank)
    ema.pt                          EMA generator (rank 0)
    rank-{r}.pt                     step, noise RNG, data position of rank r
    config.json                     the resolved config (rank 0)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.ema import EMA
from trainer.engines import Engine


def save(
    directory: Path,
    rank: int,
    G: Engine,
    D: Engine,
    ema: EMA,
    step: int,
    noise: torch.Generator,
    data_state: dict,
    config: dict,
) -> None:
    """Write this rank's part of a checkpoint (collective: every rank must call it)."""
    directory.mkdir(parents=True, exist_ok=True)
    G.save(directory / "G")
    D.save(directory / "D")
    torch.save(
        {"step": step, "noise_rng": noise.get_state(), "data": json.dumps(data_state)},
        directory / f"rank-{rank}.pt",
    )
    if rank == 0:
        torch.save(ema.state_dict(), directory / "ema.pt")
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def load(
    directory: Path, rank: int, G: Engine, D: Engine, ema: EMA, noise: torch.Generator
) -> tuple[int, dict]:
    """Restore a checkpoint written by `save`; returns (step, data state of this rank)."""
    G.load(directory / "G")
    D.load(directory / "D")
    ema.load_state_dict(torch.load(directory / "ema.pt", weights_only=True))
    own = directory / f"rank-{rank}.pt"
    if not own.exists():
        raise FileNotFoundError(
            f"{own} is missing: the checkpoint was written by fewer workers; resume with the same "
            "trainer.num_workers"
        )
    state = torch.load(own, weights_only=True)
    noise.set_state(state["noise_rng"])
    return int(state["step"]), json.loads(state["data"])


def load_config(directory: Path) -> dict:
    """The resolved config a checkpoint was written with."""
    return json.loads((directory / "config.json").read_text())


def load_ema_weights(directory: Path) -> dict:
    """Only the EMA generator's state dict (what gets registered)."""
    return torch.load(directory / "ema.pt", weights_only=True)["module"]
