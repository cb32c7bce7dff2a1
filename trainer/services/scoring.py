"""Scoring registered versions: evaluate one on its training data (or given shards) and record
the result on the version; the shared pieces of `trainer.evaluate` and `trainer.promote`."""

from __future__ import annotations

import ast
from dataclasses import dataclass

import torch

from data_pipeline.shards import ShardSpecError
from trainer.config import EvalConfig
from trainer.eval.evaluator import Evaluator, Result
from trainer.services import tracking

ERRORS = (ValueError, LookupError, FileNotFoundError, ShardSpecError)


@dataclass
class DataKeys:
    urls: str = ""  # "" = the shards the version was trained on (its `dataset` tag)


def training_data(tags: dict[str, str]) -> str | list[str]:
    """The shard spec a version was trained on, from its `dataset` tag."""
    raw = tags.get("dataset", "")
    if raw.startswith("["):
        return list(ast.literal_eval(raw))
    if not raw:
        raise ValueError("the version has no dataset tag: pass data.urls=SHARDS")
    return raw


def evaluate(
    model: str,
    urls: str | list[str] = "",
    opts: EvalConfig | None = None,
    tracking_uri: str = "",
    device: str = "auto",
    log: bool = True,
    progress: bool = True,
    replace_scores: bool = False,
) -> tuple[Result, Result]:
    """(the generator's result, the real data's own row) for `model` on `urls`. With `log`, the
    result becomes a record on the version; with `replace_scores` also its promotion scores."""
    opts = opts or EvalConfig()
    uri = tracking.resolve_uri(tracking_uri)
    name, version = tracking.resolve_version(uri, model)
    urls = urls or training_data(tracking.version_tags(uri, name, version))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    evaluator = Evaluator(urls, opts, device, progress)
    generator, latent_dim = tracking.load_generator(uri, f"models:/{name}/{version}")
    result = evaluator(generator.to(device), latent_dim)
    if log:
        n = tracking.log_evaluation(uri, name, version, result.metrics, result.info, scores=replace_scores)
        result.info["record"] = str(n)
    return result, evaluator.data_row()


def ensure_evaluated(uri: str, name: str, version: str, evaluator: Evaluator) -> None:
    """Score `version` under this evaluator's comparability key unless its promotion scores
    already have that key (data identity, feature network, both counts, seed); a new score
    becomes the version's promotion score, and a record."""
    tags = tracking.version_tags(uri, name, version)
    if tags.get("eval.key") == evaluator.info(evaluator.opts.num)["key"]:
        return
    generator, latent_dim = tracking.load_generator(uri, f"models:/{name}/{version}")
    result = evaluator(generator.to(evaluator.device), latent_dim)
    print(f"evaluated v{version}: {result.line()}")
    tracking.log_evaluation(uri, name, version, result.metrics, result.info)
