"""Which generator is `champion`: a new version becomes it only when it is better.

Every registered version carries its evaluation as tags (`eval.fid`, `eval.features`,
`eval.data_sha256`, ...) and its stability flags (`stability.flags`). `decide` compares a
candidate with the current champion on the primary metric (lower is better for each: fid,
kid, mmd, swd) and returns the decision with both values and the reason; `promote` applies it to the
registry and records it on the candidate. Versions measured on different data or with a
different feature network are never compared: the champion stays.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from trainer.config import RegistryConfig
from trainer.services import tracking

log = logging.getLogger("stablegan.promotion")


@dataclass
class Decision:
    promote: bool
    reason: str
    metric: str = ""
    candidate: float | None = None
    champion: float | None = None
    champion_version: str | None = None

    def line(self, name: str, version: str, alias: str) -> str:
        verb = f"moved {alias} to" if self.promote else f"left {alias} at v{self.champion_version} for"
        if self.promote and self.champion_version is None:
            verb = f"made {alias}:"
        return f"{verb} {name} v{version}: {self.reason}"


def primary_metric(cfg: RegistryConfig, tags: dict[str, str]) -> str:
    """`registry.primary`, with auto = mmd for 2-D generators, fid for images."""
    if cfg.primary != "auto":
        return cfg.primary
    return "mmd" if tags.get("eval.features") == "points" else "fid"


def _value(tags: dict[str, str], metric: str) -> float | None:
    raw = tags.get(f"eval.{metric}")
    return float(raw) if raw not in (None, "") else None


def decide(
    cand: dict[str, str],
    champ: dict[str, str] | None,
    cfg: RegistryConfig,
    champion_version: str | None = None,
    force: str = "",
) -> Decision:
    """Promote or not, and why. `force` (a reason) overrides every rule."""
    metric = primary_metric(cfg, cand)
    c = _value(cand, metric)
    h = _value(champ, metric) if champ is not None else None
    d = Decision(False, "", metric, c, h, champion_version)
    if force:
        d.promote, d.reason = True, f"forced by hand: {force}"
    elif cand.get("stability.flags"):
        d.reason = f"the candidate has stability flags ({cand['stability.flags']})"
    elif c is None or not math.isfinite(c):
        d.reason = f"the candidate has no finite {metric} (evaluate it: python -m trainer.promote)"
        d.promote = champ is None
        if d.promote:
            d.reason = f"no champion yet ({d.reason})"
    elif champ is None:
        d.promote, d.reason = True, f"no champion yet; {metric} {c:.4g}"
    elif (cand.get("eval.data_sha256"), cand.get("eval.features")) != (
        champ.get("eval.data_sha256"),
        champ.get("eval.features"),
    ):
        d.reason = (
            f"not comparable: the champion was evaluated on data {champ.get('eval.data_sha256', '?')[:12]} "
            f"with {champ.get('eval.features', '?')}, the candidate on {cand.get('eval.data_sha256', '?')[:12]} "
            f"with {cand.get('eval.features', '?')} (re-evaluate both with python -m trainer.promote)"
        )
    elif h is None or not math.isfinite(h) or c < h * (1 - cfg.min_improvement):
        d.promote = True
        d.reason = f"{metric} {c:.4g} beats the champion's {h:.4g}" if h is not None else "champion unscored"
    else:
        need = f" by {cfg.min_improvement:.0%}" if cfg.min_improvement else ""
        d.reason = f"{metric} {c:.4g} does not beat the champion's {h:.4g}{need}"
    return d


def promote(uri: str, name: str, version: str, cfg: RegistryConfig, alias: str, force: str = "") -> Decision:
    """Decide for `version` against the version `alias` points at; move `alias` if it wins.
    The decision, both values and the reason are stored as the candidate's tags and logged."""
    champion_version = tracking.alias_version(uri, name, alias)
    if champion_version == version:
        return Decision(False, f"v{version} already is {alias}", champion_version=version)
    cand = tracking.version_tags(uri, name, version)
    champ = tracking.version_tags(uri, name, champion_version) if champion_version else None
    d = decide(cand, champ, cfg, champion_version, force)
    if d.promote:
        tracking.set_alias(uri, name, alias, version)
    tracking.set_version_tags(
        uri, name, version,
        {
            "promotion.decision": "promoted" if d.promote else "kept champion",
            "promotion.reason": d.reason,
            "promotion.metric": d.metric,
            "promotion.champion_version": champion_version or "",
            "promotion.champion_value": "" if d.champion is None else d.champion,
        },
    )  # fmt: skip
    log.info(d.line(name, version, alias))
    return d
