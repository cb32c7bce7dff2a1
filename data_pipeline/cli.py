"""`key=value` command lines parsed into a typed dataclass (the convention `trainer.main` uses)."""

from __future__ import annotations

from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

T = TypeVar("T")


def parse_overrides(schema: type[T], argv: list[str]) -> T:
    """Merge `key=value` items onto the dataclass `schema`; unknown keys and bad types raise."""
    bad = [a for a in argv if "=" not in a or a.startswith("=")]
    if bad:
        raise ValueError(f"arguments must be key=value, got {bad}")
    base = OmegaConf.structured(schema)
    allowed = ", ".join(base.keys())
    for item in argv:
        key = item.split("=", 1)[0].lstrip("+")
        if key not in base:
            raise ValueError(f"unknown key {key!r}; allowed keys: {allowed}")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist([a.lstrip("+") for a in argv]))
    except (ValidationError, ConfigKeyError) as exc:
        raise ValueError(f"invalid value: {exc.msg.splitlines()[0]} (key {exc.full_key})") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
