"""Decide by hand whether a registered version becomes the champion.

    python -m trainer.promote model=models:/stablegan-generator/4
    python -m trainer.promote model=models:/NAME/4 force=true reason="hand-checked samples"

The version and the current champion are both scored on the same data and feature network
(evaluated now where their stored evaluation does not match), then compared as at the end of
training (`registry.primary`, `registry.min_improvement`, stability flags). `force=true`
moves the alias whatever the comparison says; the reason is stored on the version.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from trainer.config import EvalConfig, RegistryConfig, TrackingKeys
from trainer.config.cli import run_command
from trainer.eval.evaluator import Evaluator
from trainer.services import promotion, tracking
from trainer.services.scoring import ERRORS, DataKeys, ensure_evaluated, training_data


@dataclass
class PromoteConfig:
    model: str = ""  # models:/NAME/VERSION (or models:/NAME@ALIAS)
    alias: str = "champion"
    data: DataKeys = field(default_factory=DataKeys)  # "" = the version's training data
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    force: bool = False
    reason: str = ""  # required with force=true
    tracking: TrackingKeys = field(default_factory=TrackingKeys)  # tracking.uri


def run(cfg: PromoteConfig) -> promotion.Decision:
    uri = tracking.resolve_uri(cfg.tracking.uri)
    name, version = tracking.resolve_version(uri, cfg.model)
    urls = cfg.data.urls or training_data(tracking.version_tags(uri, name, version))
    evaluator = Evaluator(urls, cfg.eval)
    if not evaluator.data_sha256:
        raise ValueError(
            f"data.urls={urls!r} has no manifest: promotion compares only on a shard set "
            "with a manifest (make_shards writes one)"
        )
    ensure_evaluated(uri, name, version, evaluator)
    champion = tracking.alias_version(uri, name, cfg.alias)
    if champion and champion != version:
        ensure_evaluated(uri, name, champion, evaluator)
    decision = promotion.promote(uri, name, version, cfg.registry, cfg.alias, cfg.reason if cfg.force else "")
    print(decision.line(name, version, cfg.alias))
    return decision


def main(argv: list[str] | None = None) -> int:
    def body(cfg: PromoteConfig) -> None:
        if not cfg.model:
            raise ValueError("model=models:/NAME/VERSION is required")
        if cfg.force and not cfg.reason:
            raise ValueError('force=true needs reason="..." (it is stored on the version)')
        cfg.eval.check()
        cfg.registry.check()
        run(cfg)

    return run_command("promote", __doc__ or "", PromoteConfig, argv, body, ERRORS)


if __name__ == "__main__":
    sys.exit(main())
