"""Evaluate a registered generator: FID, KID, precision/recall, density/coverage (images) or
mode metrics, spread, sliced Wasserstein and MMD (2-D), logged to the model version in MLflow.

    python -m trainer.evaluate model=models:/stablegan-generator@champion
    python -m trainer.evaluate model=models:/NAME/3 data.urls=shards/stacked num=10000 eval.features=digits

`data.urls` defaults to the shards the version was trained on; every `eval.*` key of the
training config is accepted (eval.features, eval.inception_weights, eval.batch_size, ...).
The real data's own row is printed beside the generator's. The result is kept on the version
as an evaluation record (tag `eval.record.N`, with its comparability key); the scores that
promotion compares stay as they are unless `replace_scores=true`. From Python: `evaluate(...)`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

from trainer.config import EvalConfig, TrackingKeys
from trainer.config.cli import run_command
from trainer.eval.evaluator import Result
from trainer.services.scoring import ERRORS, DataKeys, evaluate


@dataclass
class EvaluateConfig:
    model: str = ""  # models:/NAME@ALIAS or models:/NAME/VERSION
    data: DataKeys = field(default_factory=DataKeys)
    num: int = 0  # generated samples; 0 = eval.num
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto = cuda when available
    log: bool = True  # keep the result on the model version, as a record (tag eval.record.N)
    # also make it the version's promotion scores (tags eval.*, model metrics eval/*)
    replace_scores: bool = False
    tracking: TrackingKeys = field(default_factory=TrackingKeys)  # tracking.uri


def table(rows: list[tuple[str, Result]]) -> str:
    """A fixed-width table: one row per result, one column per metric."""
    keys = list(rows[0][1].metrics)
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{k:>10}" for k in keys)]
    for label, r in rows:
        lines.append(
            f"{label:{width}}  " + "  ".join(f"{r.metrics.get(k, float('nan')):>10.4g}" for k in keys)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def body(cfg: EvaluateConfig) -> None:
        if not cfg.model:
            raise ValueError("model=models:/NAME@ALIAS (or models:/NAME/VERSION) is required")
        cfg.eval.check()
        opts = replace(cfg.eval, num=cfg.num or cfg.eval.num)
        result, data = evaluate(
            cfg.model,
            cfg.data.urls,
            opts,
            cfg.tracking.uri,
            cfg.device,
            cfg.log,
            replace_scores=cfg.replace_scores,
        )
        info = result.info
        print(
            f"features {info['features']}; data {info['data_sha256'][:12] or '(no identity: not comparable)'}; "
            f"{info['num_fake']} generated vs {info['num_real']} real samples; latent seed {info['seed']}; "
            f"comparability key {info['key']}"
        )
        print(table([(cfg.model, result), (f"real data ({data.info.get('note', 'fresh draws')})", data)]))
        if cfg.log and cfg.replace_scores:
            print(
                f"recorded as evaluation {info['record']} and made the version's promotion scores (tags eval.*)"
            )
        elif cfg.log:
            print(
                f"recorded as evaluation {info['record']} of the version (tag eval.record.{info['record']}); "
                "its promotion scores are unchanged (replace_scores=true replaces them)"
            )

    return run_command("evaluate", __doc__ or "", EvaluateConfig, argv, body, ERRORS)


if __name__ == "__main__":
    sys.exit(main())
