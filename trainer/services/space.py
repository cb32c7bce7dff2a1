"""A sweep's search space (`tune.space`): each key of the training config mapped to a
distribution written as text, parsed and checked before anything starts.

    optim.g_lr: loguniform(1e-4, 1e-2)     penalty.weight: choice(0.1, 1, 10)
    trainer.seed: grid(1, 2, 3)            model.g_width: randint(64, 257)
    optim.g_lr+optim.d_lr: grid(1e-4, 1e-3)   (keys tied: each trial sets both to one value)

Every value a distribution can take at its ends (and each choice) is put into the config and
checked as a run's config is, so a range that would fail a trial fails here, with the key named.
"""

from __future__ import annotations

import ast
import copy
import itertools
import math
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from ray import tune

from trainer.config import Config, ConfigError, allowed_keys, from_dict, validate

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
_SPEC = re.compile(r"(\w+)\s*\((.*)\)", re.S)
# Keys a trial's identity or the sweep itself owns: searching them would mix trials up.
NOT_SEARCHABLE = ("trainer.run_name", "trainer.storage_path", "tracking.", "cluster.", "tune.")


@dataclass(frozen=True)
class Dimension:
    """One searched key and its distribution."""

    key: str
    kind: str
    args: tuple

    def domain(self) -> Any:
        """Ray Tune's search domain for this dimension."""
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def mutation(self) -> Any:
        """What population-based training perturbs this dimension over: the distribution
        (a continuous value is scaled by 0.8 or 1.2, or drawn again), or the list of values."""
        return list(self.args) if self.kind in ("choice", "grid") else self.domain()

    def probes(self) -> list:
        """The values checked before a sweep starts: the range's ends, or every choice."""
        if self.kind == "randint":  # Ray's randint excludes its upper end
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def log_scale(self) -> bool:
        """Drawn on a log scale, or positive numbers spanning a decade or more."""
        if self.kind == "loguniform":
            return True
        numbers = [a for a in self.args if isinstance(a, int | float) and not isinstance(a, bool)]
        return len(numbers) == len(self.args) and min(numbers) > 0 and max(numbers) >= 10 * min(numbers)


def grid_points(dims: tuple[Dimension, ...], num_samples: int, seed: int) -> list[dict] | None:
    """Every point of the space's grid dimensions, each `num_samples` times, in an order drawn
    from `seed` (Tune runs them first, drawing the other dimensions for each); None when no
    dimension is a grid."""
    grids = [d for d in dims if d.kind == "grid"]
    if not grids:
        return None
    keys = [d.key for d in grids]
    points = [dict(zip(keys, values)) for values in itertools.product(*(d.args for d in grids))]
    points *= num_samples
    random.Random(seed).shuffle(points)
    return points


def parse_space(space: dict[str, str], base: Config) -> list[Dimension]:
    """`tune.space` as checked dimensions; a `ConfigError` names the first bad key or range."""
    if not space:
        raise ConfigError(
            "tune.space is empty: pick a search space (tune=lr, tune=lr_gamma) or give one, e.g. "
            "'tune.space={optim.g_lr: \"loguniform(1e-4, 1e-2)\"}'"
        )
    dims = [parse_one(key, str(spec)) for key, spec in space.items()]
    base_dict = asdict(base)
    for dim in dims:
        for value in dim.probes():
            try:
                with_values(base_dict, {dim.key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space {dim.key}: the value {value!r} fails: {exc}") from None
    return dims


def parse_one(key: str, spec: str) -> Dimension:
    """One `key: kind(args)` entry, its key and arguments checked."""
    for each in key.split("+"):
        check_key(each)
    match = _SPEC.fullmatch(spec.strip())
    if match is None or match.group(1) not in KINDS:
        raise ConfigError(
            f"tune.space {key}: {spec!r} is not a distribution; write one of "
            f"{', '.join(k + '(...)' for k in KINDS)}"
        )
    kind = match.group(1)
    try:
        args = ast.literal_eval(f"({match.group(2)},)") if match.group(2).strip() else ()
    except (ValueError, SyntaxError):
        raise ConfigError(f"tune.space {key}: cannot read the arguments of {spec!r}") from None
    if kind in ("choice", "grid"):
        if not args:
            raise ConfigError(f"tune.space {key}: {kind}() needs at least one value")
        return Dimension(key, kind, tuple(args))
    return Dimension(key, kind, check_range(key, kind, args))


def check_range(key: str, kind: str, args: tuple) -> tuple:
    if len(args) != 2 or not all(isinstance(a, int | float) and math.isfinite(a) for a in args):
        raise ConfigError(f"tune.space {key}: {kind} takes two finite numbers (low, high), got {args}")
    low, high = args
    if not low < high:
        raise ConfigError(f"tune.space {key}: {kind}({low}, {high}) needs low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"tune.space {key}: loguniform({low}, {high}) needs low > 0")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"tune.space {key}: randint takes integers, got {args}")
    return (float(low), float(high)) if kind != "randint" else (low, high)


def check_key(key: str) -> None:
    """A leaf of the training config that a trial may set."""
    section, _, leaf = key.rpartition(".")
    keys = allowed_keys(section) if section else None
    if keys is None or leaf not in keys:
        hint = f"; keys of {section}: {', '.join(keys or [])}" if keys else ""
        raise ConfigError(f"tune.space: unknown key {key!r}{hint}")
    if allowed_keys(key) is not None:
        raise ConfigError(f"tune.space: {key!r} is a section; search one of its keys")
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_SEARCHABLE):
        raise ConfigError(f"tune.space: {key!r} belongs to the sweep, not to a trial; it cannot be searched")


def with_values(base: dict, values: dict[str, Any]) -> Config:
    """The checked `Config` of `base` (its dict form) with dotted `values` set (a key of tied
    keys, `a.b+c.d`, sets each of them)."""
    data = copy.deepcopy(base)
    for key, value in ((k, v) for tied, v in values.items() for k in tied.split("+")):
        *path, leaf = key.split(".")
        node = data
        for part in path:
            node = node[part]
        node[leaf] = value
    return validate(from_dict(data))
