"""`key=value` command lines parsed into a typed dataclass (the convention `trainer.main` uses)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

T = TypeVar("T")
# Keys renamed so that every command names the same thing alike (as `trainer.main` does); the old
# spelling still works, with a note.
RENAMED = {"tracking_uri": "tracking.uri"}


def parse_overrides(schema: type[T], argv: list[str], aliases: dict[str, str] | None = None) -> T:
    """Merge `key=value` items (dotted for nested sections) onto the dataclass `schema`;
    unknown keys and bad types raise. `aliases` maps another accepted spelling of a key (training's
    name for the same thing, e.g. `data.urls` for make_shards' `out`) onto the schema's key."""
    argv = [aliased(renamed(a), aliases or {}) for a in argv]
    bad = [a for a in argv if "=" not in a or a.startswith("=")]
    if bad:
        raise ValueError(f"arguments must be key=value, got {bad}")
    base = OmegaConf.structured(schema)
    allowed = ", ".join(base.keys())
    missing = object()
    for item in argv:
        key = item.split("=", 1)[0].lstrip("+")
        if OmegaConf.select(base, key, default=missing) is missing:
            section = key.rpartition(".")[0]
            if section and OmegaConf.select(base, section, default=None) is not None:
                allowed = ", ".join(f"{section}.{k}" for k in OmegaConf.select(base, section).keys())
            raise ValueError(f"unknown key {key!r}; allowed keys: {allowed}")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist([a.lstrip("+") for a in argv]))
    except (ValidationError, ConfigKeyError) as exc:
        raise ValueError(f"invalid value: {exc.msg.splitlines()[0]} (key {exc.full_key})") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def aliased(item: str, aliases: dict[str, str]) -> str:
    key, sep, value = item.partition("=")
    return f"{aliases[key.lstrip('+')]}={value}" if sep and key.lstrip("+") in aliases else item


def renamed(item: str) -> str:
    key, sep, value = item.partition("=")
    if sep and key.lstrip("+") in RENAMED:
        new = RENAMED[key.lstrip("+")]
        print(f"note: {key}= is now {new}=", file=sys.stderr)
        return f"{new}={value}"
    return item


def run_command(
    prog: str,
    doc: str,
    schema: type[T],
    argv: list[str] | None,
    body: Callable[[T], None],
    errors: tuple[type[BaseException], ...] = (ValueError, LookupError, FileNotFoundError),
) -> int:
    """A `key=value` command's main: `-h` prints `doc`; the parsed config goes to `body`; an
    error a user can fix is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(doc)
        return 0
    try:
        body(parse_overrides(schema, argv))
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
