"""Register a finished run's saved generator when registering at the end of training failed.

    python -m trainer.register weights=runs/NAME/generator_ema.pt run_id=RUN_ID [tracking.uri=...]

The run folder holds `generator_ema.pt` (a state dict) and `config.json` (the resolved config).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import TrackingKeys, from_dict
from trainer.config.cli import parse_overrides
from trainer.services import finetune, tracking
from trainer.services.conclude import register_saved


@dataclass
class RegisterConfig:
    weights: str = ""
    run_id: str = ""
    tracking: TrackingKeys = field(default_factory=TrackingKeys)  # tracking.uri


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_overrides(RegisterConfig, argv)
        weights = Path(args.weights)
        config_file = weights.parent / "config.json"
        if not weights.is_file() or not config_file.is_file():
            raise ValueError(
                f"weights={args.weights!r}: need the file and config.json beside it (a run folder)"
            )
        if not args.run_id:
            raise ValueError("run_id=... is required (printed as mlflow_run_id at the end of training)")
        cfg = from_dict(json.loads(config_file.read_text()))
        uri = tracking.resolve_uri(args.tracking.uri or cfg.tracking.uri)
        try:  # so the version can be fine-tuned from; registering does not depend on it
            finetune.log_weights(uri, args.run_id, weights.parent)
        except Exception as exc:  # noqa: BLE001 - the registration below is what was asked for
            print(f"register: note: weights not logged for fine-tuning ({exc})", file=sys.stderr)
        # The run's stability verdict, as it ended (none when it made no stability summary).
        run_tags = tracking.run_tags(uri, args.run_id)
        flags = run_tags.get("stablegan.stability_flags")
        flags = None if flags is None else tuple(f for f in flags.split(",") if f)
        version, decision = register_saved(weights, cfg, args.run_id, uri, str(cfg.data.urls), flags=flags)
        print(version)
        print(decision)
    except (ValueError, FileNotFoundError) as exc:
        print(f"register: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
