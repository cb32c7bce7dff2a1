"""`stablegan COMMAND KEY=VALUE ...`: every entry point under one command, with the same key
names for the same things (`tracking.uri`, `data.urls`, `model.*`, `eval.*`).

    stablegan train experiment=images data.urls=shards/faces      # = python -m trainer.main
    stablegan tune experiment=grid25 tune=lr tune.num_samples=8   # a sweep on Ray Tune
    stablegan sample model=models:/faces@champion num=64 out=faces.png
    stablegan evaluate model=models:/faces@champion
    stablegan promote model=models:/faces/4
    stablegan register weights=runs/NAME/generator_ema.pt run_id=RUN_ID
    stablegan make-shards source=folder src=~/faces out=shards/faces resolution=64 channels=3

`stablegan COMMAND --help` shows a command's keys. `python -m trainer.main` (and the other
modules) keep working, e.g. for `ray job submit`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "trainer.main",
    "tune": "trainer.tune",
    "sample": "trainer.sample",
    "evaluate": "trainer.evaluate",
    "promote": "trainer.promote",
    "register": "trainer.register",
    "make-shards": "data_pipeline.make_shards",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"stablegan: unknown command {command!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    if command == "train":  # Hydra reads sys.argv itself
        sys.argv = [f"stablegan {command}", *rest]
        module.main()
        return 0
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
