"""Fine-tuning: `trainer.init_from=models:/NAME@ALIAS` starts a run from a registered version.

Every run logs its final EMA generator and its discriminator as state dicts
(`weights/generator_ema.pt`, `weights/discriminator.pt`) beside the registered model. The
driver downloads them from the version's run before Ray starts, checks that they fit this
run's model, and hands their paths to the workers, which load them before wrapping G and D in
their engines (so optimizer master copies start from them too). G and its EMA both start from
the registered EMA weights; D from the logged discriminator, or fresh when the run has none.
A resumed run continues from its own checkpoint instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import Config
from trainer.services import tracking
from trainer.train.worker import build_models

WEIGHTS = "weights"
G_FILE, D_FILE = "generator_ema.pt", "discriminator.pt"


class InitError(ValueError):
    """`trainer.init_from` cannot be used; the message says why and what to do."""


@dataclass
class Init:
    """Where a fine-tuning run starts: weight files and the lineage to record."""

    generator: str
    discriminator: str | None
    version: str  # models:/NAME/VERSION
    parent_run_id: str

    def tags(self) -> dict[str, str]:
        return {
            "stablegan.init_from": self.version,
            "stablegan.parent_run_id": self.parent_run_id,
            "stablegan.init_discriminator": str(self.discriminator is not None).lower(),
        }


def fetch(cfg: Config, uri: str, dest: Path) -> Init:
    """Download `cfg.trainer.init_from`'s weights under `dest` and check they fit `cfg`."""
    name, version = tracking.resolve_version(uri, cfg.trainer.init_from)
    run_id = tracking.version_run(uri, name, version)
    g_path = tracking.download_file(uri, run_id, f"{WEIGHTS}/{G_FILE}", dest / "G")
    if g_path is None:
        raise InitError(
            f"trainer.init_from={cfg.trainer.init_from}: its run {run_id} logged no {WEIGHTS}/{G_FILE} "
            "(versions registered before fine-tuning existed); register it again with python -m "
            "trainer.register, which logs the weights"
        )
    d_path = tracking.download_file(uri, run_id, f"{WEIGHTS}/{D_FILE}", dest / "D")
    G, D = build_models(cfg)
    check_fits(cfg, "generator", G, g_path)
    if d_path is not None:
        check_fits(cfg, "discriminator", D, d_path)
    return Init(str(g_path), str(d_path) if d_path else None, f"models:/{name}/{version}", run_id)


def check_fits(cfg: Config, what: str, module: torch.nn.Module, path: Path) -> None:
    try:
        module.load_state_dict(torch.load(path, weights_only=True))
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise InitError(
            f"trainer.init_from={cfg.trainer.init_from}: its {what} does not fit this run's model "
            f"({first}); use the model.* settings of the run that trained it"
        ) from None


def log_weights(uri: str, run_id: str, out_dir: Path) -> None:
    """Log a finished run's EMA generator and discriminator (those the driver wrote into
    `out_dir`) for later fine-tuning."""
    files = [out_dir / f for f in (G_FILE, D_FILE) if (out_dir / f).is_file()]
    tracking.log_files(uri, run_id, files, WEIGHTS)
