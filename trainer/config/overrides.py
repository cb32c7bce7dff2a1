"""Command-line overrides, checked and prepared before Hydra parses them.

Hydra's schema rejects an unknown key too, but with a traceback-style message that does not
list the allowed keys; `check_overrides` names them. `prepare_overrides` is the one rewrite of
argv, for two things Hydra's grammar reads otherwise: a brace pattern in `*.urls` (Hydra would
parse `{a..b}` as a dict: it is quoted) and new keys under a free-form dict field
(`trainer.worker_resources`: a typed dict takes new keys only as `++key=value`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from trainer.config.schema import ConfigError, allowed_keys, dict_keys

# A wheel ships the config tree inside the package (setup.py); a checkout has it at the top level.
_PACKAGED = Path(__file__).resolve().parent.parent / "configs"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent.parent / "configs"


def _groups() -> tuple[str, ...]:
    """The config groups are the tree's folders (a new one is known to the checks below at
    once), in the order of the root config's defaults list, then any others by name."""
    listed = [
        next(iter(d)) for d in OmegaConf.load(CONFIG_DIR / "config.yaml").defaults if not isinstance(d, str)
    ]
    folders = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    return (*[g for g in listed if g in folders], *sorted(folders - set(listed)))


GROUPS = _groups()
DICT_KEYS = dict_keys()  # free-form dict fields: any key below them is allowed


def _in_dict_field(key: str) -> bool:
    return key in DICT_KEYS or key.rsplit(".", 1)[0] in DICT_KEYS


def check_overrides(argv: list[str]) -> None:
    """Reject unknown keys before Hydra does, naming the allowed ones at that level."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.startswith(("hydra", "+hydra", "~")):
            continue
        key = arg.split("=", 1)[0].lstrip("+")
        if _in_dict_field(key):
            continue
        if "." not in key:
            if key not in GROUPS and key not in allowed_keys(""):
                raise ConfigError(f"unknown key {key!r}; config groups: {', '.join(GROUPS)}")
            continue
        parent, leaf = key.rsplit(".", 1)
        allowed = allowed_keys(parent)
        if allowed is None:
            sections = [k for k in allowed_keys("") or [] if allowed_keys(k) is not None]
            raise ConfigError(
                f"unknown key {key!r}: {parent!r} is not a config section; sections: {', '.join(sections)}"
            )
        if leaf not in allowed:
            raise ConfigError(f"unknown key {key!r}; allowed keys in {parent}: {', '.join(allowed)}")


def prepare_overrides(argv: list[str]) -> list[str]:
    """`data.urls=x-{000000..000009}.tar` -> quoted, so Hydra reads the braces as text;
    `trainer.worker_resources={a:1}` -> `++...`, since a typed dict only takes new keys that way;
    `experiment=PATH.yaml` (a preset outside the tree, e.g. a sweep's best config) -> Hydra's
    search path and the preset's name."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "experiment" and value.endswith((".yaml", ".yml")):
            out += experiment_file(value)
            continue
        if sep and _in_dict_field(key):
            arg = f"++{arg}"
        if sep and key.lstrip("+").endswith("urls") and "{" in value and value[:1] not in ("'", '"', "["):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def experiment_file(path: str) -> list[str]:
    """The overrides that select the preset file `path`: its folder's parent joins Hydra's
    search path, so the file must lie in a folder named `experiment` (as a sweep writes it)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"experiment={path}: no such file; give a preset name or an existing YAML file")
    if file.parent.name != "experiment":
        raise ConfigError(
            f"experiment={path}: a preset file must lie in a folder named 'experiment' (Hydra reads it "
            f"as that group); move it to {file.parent / 'experiment' / file.name}"
        )
    return [f"hydra.searchpath=[file://{file.parent.parent}]", f"experiment={file.stem}"]
