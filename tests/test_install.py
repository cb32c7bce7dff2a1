"""A non-editable install: the project built as a wheel (its config tree inside), installed
into a folder of its own and run from another directory: it trains on the embedded Ray and the
registered generator samples. Slow: builds the wheel and trains."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_wheel_install_trains_and_samples_from_another_directory(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], check=True, timeout=600)
    (wheel,) = wheels.glob("stablegan-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(site)  # the wheel's copy comes first (the checkout is not on the path)

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    where = run("-c", "import trainer.main as m, trainer; print(trainer.__file__, m.CONFIG_DIR)")
    assert where.split() == [str(site / "trainer" / "__init__.py"), str(site / "trainer" / "configs")]
    out = run(
        "-m", "trainer.main", "trainer.max_steps=40", "trainer.log_every=20", "trainer.checkpoint_every=40"
    )
    assert "finished 40 steps" in out and "made champion" in out
    run("-m", "trainer.sample", "model=models:/stablegan-generator@champion", "num=500", "out=points.png")
    assert (work / "points.png").stat().st_size > 1000 and (work / "mlflow.db").is_file()
