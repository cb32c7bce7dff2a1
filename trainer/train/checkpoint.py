"""The whole training state as files: both engines (with optimizer states), EMA, counters,
RNG, data position per rank, and the resolved config. No pickled modules: our own files are
state dicts loaded with `weights_only=True`.

Layout of one checkpoint directory (every rank writes its own files into it; Ray Train merges
the ranks' uploads into one checkpoint):

    G/state/...  D/state/...        DeepSpeed module + optimizer (ZeRO partitions per rank)
    ema.pt                          EMA generator (rank 0)
    rank-{r}.pt                     step, noise RNG, data position of rank r
    config.json                     the resolved config (rank 0)
    MANIFEST-rank{r}.json           sha256 of every file rank r wrote, written last

A checkpoint counts only when every manifest's files are there with the right checksums:
`verify` checks that before a restore, and `latest_valid` takes the newest complete one of
the run (falling back past a truncated or corrupt one). Ray Train copies each rank's files into
the checkpoint folder in place and registers the checkpoint once every rank has reported, so a
folder alone proves nothing; the manifests do. Keeping the last `trainer.keep_checkpoints` is
Ray's `CheckpointConfig(num_to_keep)`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import torch

from data_pipeline.shards import sha256_file
from trainer.config import ModelConfig
from trainer.gan.ema import EMA
from trainer.train.engines import Engine

log = logging.getLogger("stablegan.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or from an incompatible config; the message says which."""


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
    extra: dict | None = None,
) -> None:
    """Write this rank's part of a checkpoint (collective: every rank must call it).

    `extra` is JSON-serialisable state of this rank's (the stability guard's), returned by `load`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    G.save(directory / "G")
    D.save(directory / "D")
    torch.save(
        {
            "step": step,
            "noise_rng": noise.get_state(),
            "data": json.dumps(data_state),
            "extra": json.dumps(extra or {}),
        },
        directory / f"rank-{rank}.pt",
    )
    if rank == 0:
        torch.save(ema.state_dict(), directory / "ema.pt")
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    # Every file in this rank's folder is this rank's (each rank saves into its own temp dir).
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith("MANIFEST-")
    }
    (directory / f"MANIFEST-rank{rank}.json").write_text(json.dumps({"step": step, "files": files}))


def verify(directory: Path, expected_ranks: int | None = None) -> int:
    """Check every rank's manifest against the files; return the step. Raises CheckpointError.

    With `expected_ranks`, a checkpoint with fewer manifests (still being written) fails too.
    """
    manifests = sorted(directory.glob("MANIFEST-rank*.json"))
    if not manifests:
        raise CheckpointError(f"{directory}: no MANIFEST-rank*.json (incomplete, or older than checksums)")
    if expected_ranks is not None and len(manifests) != expected_ranks:
        raise CheckpointError(f"{directory}: {len(manifests)} of {expected_ranks} ranks' manifests")
    steps = set()
    for manifest in manifests:
        try:
            entry = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{manifest}: unreadable manifest ({exc})") from None
        steps.add(entry["step"])
        for rel, digest in entry["files"].items():
            path = directory / rel
            if not path.is_file():
                raise CheckpointError(f"{directory}: {rel} is missing")
            if sha256_file(path) != digest:
                raise CheckpointError(f"{directory}: {rel} does not match its sha256 (truncated or corrupt)")
    if len(steps) != 1:
        raise CheckpointError(f"{directory}: ranks' manifests disagree on the step: {sorted(steps)}")
    return steps.pop()


def _order(folder: Path) -> tuple[int, int]:
    """Chronological order of a run's checkpoint folders: `checkpoint_{step}` then, after the
    guard's k-th rollback, `checkpoint_{step}-r{k}` (later branches restart at lower steps)."""
    name = folder.name.removeprefix("checkpoint_")
    step, _, branch = name.partition("-r")
    try:
        return int(branch or 0), int(step)
    except ValueError:
        return -1, -1


def latest_valid(directory: Path, expected_ranks: int | None = None) -> Path | None:
    """The newest checkpoint of `directory`'s run that verifies, or None.

    `directory` is the one Ray Train hands over; Ray's controller registers checkpoints
    asynchronously, so after a worker dies a newer, complete one (every rank's manifest, when
    `expected_ranks` is given) may already be on disk: it is taken. A truncated or corrupt one
    falls back to the next older. Every rank runs this over the same shared files, so all
    ranks pick the same one.
    """
    candidates = sorted(
        (p for p in directory.parent.glob("checkpoint_*") if p.is_dir() and _order(p) >= (0, 0)),
        key=_order,
        reverse=True,
    )
    for candidate in candidates:
        try:
            verify(candidate, expected_ranks)
        except CheckpointError as exc:
            if _order(candidate) <= _order(directory):
                log.warning("skipping checkpoint: %s", exc)
            continue
        if _order(candidate) < _order(directory):
            log.warning("checkpoint %s is unusable; resuming from %s instead", directory.name, candidate.name)
        elif candidate != directory:
            log.warning(
                "resuming from %s, newer than Ray's latest registered %s", candidate.name, directory.name
            )
        return candidate
    return None


# Which DeepSpeed optimizer-state layout a precision writes: fp32 and bf16_autocast load each
# other's at ZeRO 0-2; between fp32 and bf16 / fp16 DeepSpeed fails with KeyErrors.
_OPTIMIZER_STATE = {"fp32": "fp32", "bf16_autocast": "fp32", "bf16": "bf16", "fp16": "fp16"}


def check_compatible(saved: dict, current: dict) -> None:
    """Fail with the differing keys when a checkpoint's config cannot be resumed with `current`.

    The model must be the same, the data layout (workers x loader workers, seed, batch) that
    the data position depends on, and the layout of DeepSpeed's optimizer files: the ZeRO stage
    and the precision, where fp32 and bf16_autocast (both fp32 weights and optimizer) load each
    other's files and bf16 / fp16 (master copies, loss scaler) load only their own.
    """
    # A model key the saved config lacks predates it: that run had the key's default.
    defaults = {("model", f.name): f.default for f in fields(ModelConfig)}
    keys = [("model", k) for k in current["model"]] + [
        ("trainer", "num_workers"),
        ("trainer", "seed"),
        ("data", "loader_workers"),
        ("data", "batch_size"),
        ("parallel", "zero_stage"),
    ]
    diffs = [
        f"{a}.{b}={saved.get(a, {}).get(b, defaults.get((a, b)))!r} (now {current[a][b]!r})"
        for a, b in keys
        if saved.get(a, {}).get(b, defaults.get((a, b), current[a][b])) != current[a][b]
    ]
    was, now = saved.get("parallel", {}).get("precision"), current["parallel"]["precision"]
    if was is not None and _OPTIMIZER_STATE.get(was, was) != _OPTIMIZER_STATE.get(now, now):
        diffs.append(f"parallel.precision={was!r} (now {now!r})")
    if diffs:
        raise CheckpointError(
            "the run's checkpoint was written with a different config: "
            + ", ".join(diffs)
            + ". Resume with those values, or start a new run (another trainer.run_name)"
        )


def load(
    directory: Path, rank: int, G: Engine, D: Engine, ema: EMA, noise: torch.Generator
) -> tuple[int, dict, dict]:
    """Restore a checkpoint written by `save`; returns (step, data state, extra) of this rank."""
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
    return int(state["step"]), json.loads(state["data"]), json.loads(state.get("extra", "{}"))


def load_config(directory: Path) -> dict:
    """The resolved config a checkpoint was written with."""
    return json.loads((directory / "config.json").read_text())


def load_ema_weights(directory: Path) -> dict:
    """Only the EMA generator's state dict (what gets registered)."""
    return torch.load(directory / "ema.pt", weights_only=True)["module"]


def load_module_weights(directory: Path, net: str) -> dict[str, torch.Tensor]:
    """Rank 0's state dict of `net` ("G" or "D") in a checkpoint (replicas are identical)."""
    return torch.load(next((directory / net).rglob("mp_rank_00_model_states.pt")), weights_only=True)[
        "module"
    ]


def load_parameters(directory: Path) -> dict[str, torch.Tensor]:
    """Rank 0's G and D module states and the EMA generator of a checkpoint, as one flat dict
    ('G.<name>', 'D.<name>', 'ema.<name>'), for comparing checkpoints."""
    out = {f"ema.{k}": v for k, v in torch.load(directory / "ema.pt", weights_only=True)["module"].items()}
    for net in ("G", "D"):
        out |= {f"{net}.{k}": v for k, v in load_module_weights(directory, net).items()}
    return out
