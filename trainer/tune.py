"""Entry point: a sweep of training runs on Ray Tune (trainer/services/sweep.py).

    python -m trainer.tune experiment=grid25 tune=lr tune.num_samples=8
    stablegan tune experiment=stable_images tune=lr_gamma tune.max_concurrent=4 trainer.max_steps=2000
    stablegan tune experiment=grid25 'tune.space={optim.g_lr: "loguniform(1e-4, 1e-2)", trainer.seed: "grid(1, 2)"}'

Takes every key training takes (composed by Hydra as `trainer.main` composes it) plus the
`tune` section: `tune.space` (or a `tune=` group), `tune.num_samples`, `tune.scheduler`
(asha | fifo), `tune.max_concurrent`, `tune.metric`, `tune.name` (the same name again resumes
a stopped sweep). Ends with a summary whose `best_config:` line is a preset YAML: train it with
`stablegan train experiment=PATH`.
"""

from __future__ import annotations

import logging
import sys
import time

from trainer.config import ConfigError
from trainer.services.compose import compose
from trainer.services.plan import UserError
from trainer.services.sweep import run_sweep


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    start = time.time()
    try:
        result = run_sweep(compose(argv))
    except (ConfigError, UserError) as exc:
        print(f"stablegan tune: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nstablegan tune: finished in {time.time() - start:.0f}s")
    for k, v in result.items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
