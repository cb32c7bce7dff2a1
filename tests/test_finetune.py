"""Fine-tuning from the registry (`trainer.init_from`): a real run on the embedded Ray starts
G and D from a registered version's logged weights and records the lineage; bad sources fail
before Ray starts, naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from tests.conftest import ROOT
from trainer.main import compose
from trainer.services import finetune, tracking
from trainer.services.plan import UserError, fetch_init
from trainer.train.worker import build_models

ARGS = ["experiment=grid25", "trainer.num_workers=1"]


def register_source(uri: str, tmp_path, name: str, with_weights: bool = True) -> tuple[dict, dict, str]:
    """A version of `name` whose run logged G and D weights (seeded apart from any run)."""
    cfg = compose(ARGS)
    torch.manual_seed(123)
    G, D = build_models(cfg)
    run_id, _ = tracking.start_run(uri, "source", f"source-{name}", asdict(cfg))
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    torch.save(G.state_dict(), folder / finetune.G_FILE)
    torch.save(D.state_dict(), folder / finetune.D_FILE)
    if with_weights:
        finetune.log_weights(uri, run_id, folder)
    tracking.register_generator(uri, run_id, G, cfg.model.latent_dim, name, {})
    return G.state_dict(), D.state_dict(), run_id


def test_bad_sources_name_the_fix(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    register_source(uri, tmp_path, "bare", with_weights=False)
    register_source(uri, tmp_path, "points")
    with pytest.raises(UserError, match="logged no weights/generator_ema.pt"):
        fetch_init(
            compose([*ARGS, "trainer.init_from=models:/bare/1", f"tracking.uri={uri}"]), tmp_path / "a"
        )
    wider = compose([*ARGS, "trainer.init_from=models:/points/1", f"tracking.uri={uri}", "model.g_width=64"])
    with pytest.raises(UserError, match="its generator does not fit this run's model .*model.\\* settings"):
        fetch_init(wider, tmp_path / "b")
    with pytest.raises(UserError, match="cannot resolve models:/points@champion"):
        fetch_init(
            compose([*ARGS, "trainer.init_from=models:/points@champion", f"tracking.uri={uri}"]), tmp_path
        )
    with pytest.raises(Exception, match="is not a registered model"):
        compose([*ARGS, "trainer.init_from=runs/x/generator_ema.pt"])


@pytest.mark.slow
def test_a_run_starts_from_a_registered_version_and_records_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    g_state, d_state, parent = register_source(uri, tmp_path, "base")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    args = [
        *ARGS,
        "trainer.init_from=models:/base/1",
        f"tracking.uri={uri}",
        "tracking.registered_model=tuned",
    ]
    # A learning rate of ~0: after two steps G, its EMA and D are still the registered ones.
    args += [
        "trainer.max_steps=2",
        "optim.g_lr=1e-12",
        "optim.d_lr=1e-12",
        f"trainer.storage_path={tmp_path}/runs",
    ]
    args += ["trainer.run_name=tuned-1", "stability.every=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fine-tuning from models:/base/1: G and D" in proc.stdout
    out = tmp_path / "runs" / "tuned-1"
    for file, expected in ((finetune.G_FILE, g_state), (finetune.D_FILE, d_state)):
        got = torch.load(out / file, weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=f"{file}: {k}")
    client = tracking._client(uri)
    run = client.search_runs([client.get_experiment_by_name("stablegan").experiment_id])[0]
    assert run.data.tags["stablegan.init_from"] == "models:/base/1"
    assert run.data.tags["stablegan.parent_run_id"] == parent
    assert tracking.version_tags(uri, "tuned", "1")["init_from"] == "models:/base/1"
    # Its own weights are logged in turn, so it can be fine-tuned from too.
    assert {a.path for a in client.list_artifacts(run.info.run_id, "weights")} == {
        "weights/generator_ema.pt",
        "weights/discriminator.pt",
    }
