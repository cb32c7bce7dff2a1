"""The README's own-images example ("Everyday use"), run as written on a folder of real images
(scikit-learn's handwritten digits as PNG files under ~/faces, HOME being a temporary folder),
with fewer steps. The end-of-run Inception evaluation uses a stand-in TorchScript with the real
file's interface, put where the download would be cached (no network here)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, new_user_env
from tests.test_evaluation import make_standin_inception

pytestmark = pytest.mark.slow
FEWER_STEPS = " trainer.max_steps=10 trainer.log_every=5 trainer.checkpoint_every=10 trainer.sample_every=0"


def readme_commands() -> list[str]:
    """The command lines of the README's "Everyday use" block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Everyday use", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("python -m ")]


def run(line: str, tmp_path, env: dict) -> str:
    cmd = line.replace("python -m ", f"{sys.executable} -m ", 1)
    done = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_readme_own_images_example_runs_as_written(tmp_path):
    from sklearn.datasets import load_digits

    home, cache = tmp_path / "home", tmp_path / "cache"
    (home / "faces").mkdir(parents=True)
    for i, img in enumerate(load_digits().images[:300]):
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(home / "faces" / f"{i:04d}.png")
    cache.mkdir()
    make_standin_inception(cache / "inception-2015-12-05.pt")
    env = new_user_env(home, STABLEGAN_CACHE=str(cache))

    commands = readme_commands()
    make_shards = next(c for c in commands if "make_shards source=folder src=~/faces" in c)
    train = next(c for c in commands if "experiment=images" in c)
    sample = next(c for c in commands if c.startswith("python -m trainer.sample"))
    run(make_shards, tmp_path, env)
    assert (tmp_path / "shards" / "faces" / "manifest.json").is_file()

    out = run(train + FEWER_STEPS, tmp_path, env)
    assert "finished 10 steps" in out
    # Size and channels from the shards; scored with Inception features; registered as champion.
    assert re.search(r"evaluation: fid [\d.]+.*\(inception:\w+, 2000 samples\)", out), out[-2000:]
    assert "promotion: made champion: faces v1" in out

    run(sample, tmp_path, env)
    with Image.open(tmp_path / "faces.png") as grid:
        assert grid.mode == "RGB" and grid.size[0] >= 8 * 64  # 8 x 8 samples of 64 px
