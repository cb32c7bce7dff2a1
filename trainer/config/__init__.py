"""The typed config tree (`schema`): Hydra composes it from `configs/`, and everything below the
entry points receives a checked `Config`."""

from trainer.config.schema import *  # noqa: F403
from trainer.config.schema import __all__  # noqa: F401
