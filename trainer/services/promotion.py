"""Which generator is `champion`: a new version becomes it only when it is better.

Every registered version carries the evaluation promotion compares as tags (`eval.fid`,
`eval.features`, `eval.data_sha256`, `eval.key`, ...), whether its run produced a stability
summary (`stability.summary`) and its stability flags (`stability.flags`). `decide` compares a
candidate with the current champion on the primary metric (lower is better for each: fid,
kid, mmd, swd) and returns the decision with both values and the reason; `promote` applies it
to the registry and records it on the candidate. Two scores are compared only under one
comparability key (data identity, feature network and its weights, both sample counts, the
latent seed); otherwise the champion stays. A version whose run had no stability summary
(`stability=off`) could never have raised a flag: it is not promoted unless forced.
`promote` holds the registry's promotion lock from reading the champion to moving the alias, so
two runs finishing together cannot both win against the same stale champion.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from trainer.config import RegistryConfig
from trainer.eval.evaluator import KEY_PARTS
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
        if self.champion_version is None:
            verb = f"made {alias}:" if self.promote else f"left {alias} unset for"
        return f"{verb} {name} v{version}: {self.reason}"


def primary_metric(cfg: RegistryConfig, tags: dict[str, str]) -> str:
    """`registry.primary`, with auto = mmd for 2-D generators, fid for images."""
    if cfg.primary != "auto":
        return cfg.primary
    return "mmd" if tags.get("eval.features") == "points" else "fid"


def _value(tags: dict[str, str], metric: str) -> float | None:
    raw = tags.get(f"eval.{metric}")
    return float(raw) if raw not in (None, "") else None


def comparable(cand: dict[str, str], champ: dict[str, str]) -> str:
    """'' when the two evaluations share one comparability key, else why they do not."""
    for who, tags in (("candidate", cand), ("champion", champ)):
        if not tags.get("eval.data_sha256"):
            return (
                f"not comparable: the {who}'s evaluation data has no identity (a pipe: source); "
                "score both on shards with a manifest (python -m trainer.promote data.urls=...)"
            )
        missing = [p for p in KEY_PARTS if not tags.get(f"eval.{p}")]
        if missing:
            return (
                f"not comparable: the {who}'s evaluation records no {', '.join(missing)} (scored before "
                "comparability keys); re-evaluate both with python -m trainer.promote"
            )
    differ = [p for p in KEY_PARTS if cand[f"eval.{p}"] != champ[f"eval.{p}"]]
    if not differ:
        return ""
    said = "; ".join(f"{p} {champ[f'eval.{p}'][:12]} (champion) vs {cand[f'eval.{p}'][:12]}" for p in differ)
    return f"not comparable: {said} (re-evaluate both with python -m trainer.promote)"


def beats(c: float, h: float, min_improvement: float) -> bool:
    """`c` lower than `h` by at least `min_improvement` of |h| (so a negative KID, which its
    unbiased estimate can be, raises the bar instead of lowering it)."""
    return c < h - abs(h) * min_improvement


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
    elif cand.get("stability.summary") != "true":
        d.reason = (
            "the candidate's run made no stability summary (stability=off or stability.summary=false), "
            "so no stability flag could be raised: promote it by hand (force=true reason=...)"
        )
    elif c is None or not math.isfinite(c):
        d.reason = f"the candidate has no finite {metric} (evaluate it: python -m trainer.promote)"
        d.promote = champ is None
        if d.promote:
            d.reason = f"no champion yet ({d.reason})"
    elif champ is None:
        d.promote, d.reason = True, f"no champion yet; {metric} {c:.4g}"
    elif why := comparable(cand, champ):
        d.reason = why
    elif h is None or not math.isfinite(h) or beats(c, h, cfg.min_improvement):
        d.promote = True
        d.reason = f"{metric} {c:.4g} beats the champion's {h:.4g}" if h is not None else "champion unscored"
    else:
        need = f" by {cfg.min_improvement:.0%}" if cfg.min_improvement else ""
        d.reason = f"{metric} {c:.4g} does not beat the champion's {h:.4g}{need}"
    return d


def promote(uri: str, name: str, version: str, cfg: RegistryConfig, alias: str, force: str = "") -> Decision:
    """Decide for `version` against the version `alias` points at; move `alias` if it wins.
    The champion is read, compared and replaced under the registry's promotion lock. The
    decision, both values and the reason are stored as the candidate's tags and logged."""
    with tracking.registry_lock(uri, name):
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
