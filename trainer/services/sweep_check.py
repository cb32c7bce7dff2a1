"""A Hydra callback that refuses a parallel sweep without a shared Ray cluster, before any job
starts (`hydra.callbacks.parallel_sweep` in configs/config.yaml)."""

from __future__ import annotations

import os
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainer.config import ConfigError, exit_on_config_error


def swept_values(config: DictConfig, key: str) -> list[str]:
    """The values a command-line sweep over `key` gives the jobs (empty if `key` is not swept)."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [
        str(getattr(v, "text", v))  # a quoted value comes back as a QuotedString
        for o in parsed
        if o.key_or_group == key and o.is_sweep_override()
        for v in o.sweep_iterator()
    ]


class ParallelSweepCheck(Callback):
    """`hydra/launcher=joblib` runs jobs side by side: each would otherwise start a local Ray of
    its own, all of them competing for the same cores (and two local Rays can collide)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The composed config has cluster.address from the command line, an experiment or
        # cluster=existing alike; a sweep over cluster.address only shows in the overrides.
        launcher = config.hydra.runtime.choices.get("hydra/launcher") or "basic"
        if launcher == "basic" or os.environ.get("RAY_ADDRESS"):
            return
        if all(swept_values(config, "cluster.address") or [config.cluster.address]):
            return
        # sys.exit, not a raised ConfigError: Hydra turns a callback's Exception into a warning
        # and would launch the jobs anyway.
        exit_on_config_error(
            ConfigError(
                f"hydra/launcher={launcher} runs the sweep's jobs in parallel, and they must share one "
                "Ray cluster: start one (launch/local_cluster.sh up) and set RAY_ADDRESS or "
                "cluster.address (every value, in a sweep over it), or drop hydra/launcher to run "
                "the jobs one after another"
            )
        )
