"""Entry point: compose the config, check it, train on Ray, register the generator.

    python -m trainer.main                                  # grid25 on a local Ray, local MLflow
    python -m trainer.main experiment=digits32 trainer.num_workers=2 trainer.max_steps=500
    ray job submit --working-dir . -- python -m trainer.main experiment=dcgan64_gpu data.urls=...

Hydra composes the config here (`hydra.main`) and in `trainer.services.compose`; the work happens in
`trainer.services.driver.run`.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from trainer.config import ConfigError, exit_on_config_error
from trainer.config.overrides import CONFIG_DIR, check_overrides, prepare_overrides
from trainer.services.compose import compose, to_config
from trainer.services.driver import RegistryError, UserError, run


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        start = time.time()
        result = run(cfg)
    except (ConfigError, UserError) as exc:
        # Hydra would print a traceback; a user error deserves one clear line.
        print(f"stablegan: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RegistryError as exc:
        for k, v in exc.result.items():
            print(f"  {k}: {v}")
        print(f"stablegan: error: {exc}", file=sys.stderr)
        sys.exit(3)
    print(f"\nstablegan: finished {cfg.trainer.max_steps} steps in {time.time() - start:.0f}s")
    for k, v in result.items():
        print(f"  {k}: {v}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        check_overrides(sys.argv[1:])
        sys.argv[1:] = prepare_overrides(sys.argv[1:])
        _hydra_main()
    except ConfigError as exc:
        exit_on_config_error(exc)


__all__ = ["main", "compose", "run"]

if __name__ == "__main__":
    main()
