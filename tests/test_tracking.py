"""Tracking: the background logger never blocks training and survives a server outage."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from tests.conftest import free_port, start_mlflow_server, stop_group
from trainer.services import tracking
from trainer.train.meter import Meter, replica_drift


def test_logger_never_blocks_and_counts_what_it_could_not_send():
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    logger = tracking.RunLogger(dead, "0" * 32)
    start = time.perf_counter()
    for step in range(1, 501):
        logger.log_metrics({"d_loss": 1.0, "g_loss": 2.0}, step)
    assert time.perf_counter() - start < 0.5
    assert logger.pending() == 1000
    assert logger.close(timeout=1.0) == 1000


def test_meter_means_and_single_process_drift():
    meter = Meter()
    for v in (1.0, 2.0, 6.0):
        meter.add({"x": torch.tensor(v), "y": torch.tensor(2 * v)})
    assert meter.reduce() == {"x": 3.0, "y": 6.0}
    assert meter.reduce() == {}
    assert replica_drift(torch.nn.Linear(3, 2)) == 0.0


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": 2}) == {"a.b": 1, "a.c.d": "x", "e": 2}


@pytest.mark.slow
def test_metrics_buffered_through_a_server_outage_arrive_when_it_returns(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def start_server() -> subprocess.Popen:
        return start_mlflow_server(tmp_path, port)  # same port, same store each time

    server = start_server()
    run_id, resumed = tracking.start_run(uri, "outage", "blink", {"trainer": {"max_steps": 100}})
    assert not resumed
    stop_group(server)  # the server goes away mid-run

    logger = tracking.RunLogger(uri, run_id)
    start = time.perf_counter()
    for step in range(1, 101):
        logger.log_metrics({"g_loss": float(step)}, step)
    logger.log_bytes(b"\x89PNG fake", "samples/during_outage.png")
    assert time.perf_counter() - start < 0.5  # training did not wait
    time.sleep(3)
    assert logger.pending() == 101 and logger.send_failures >= 1

    server = start_server()  # back, same store
    try:
        assert logger.close(timeout=60) == 0
        client = MlflowClient(uri)
        assert [m.step for m in client.get_metric_history(run_id, "g_loss")] == list(range(1, 101))
        assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/during_outage.png"]
        again, resumed = tracking.start_run(uri, "outage", "blink", {"trainer": {"max_steps": 100}})
        assert resumed and again == run_id  # the same run name finds the same run
    finally:
        stop_group(server)


def test_register_saved_weights_later(tmp_path, capsys):
    """After a registry failure: `trainer.register` registers the weights a run left on disk."""
    import json
    from dataclasses import asdict

    from mlflow.tracking import MlflowClient

    from trainer import register
    from trainer.config import Config

    cfg = Config()
    cfg.model.g_width, cfg.model.depth = 16, 1
    cfg.tracking.registered_model = "later"
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id, _ = tracking.start_run(uri, "later", "run-a", asdict(cfg))
    from trainer.services.conclude import build_generator

    weights = tmp_path / "run-a" / "generator_ema.pt"
    weights.parent.mkdir()
    torch.save(build_generator(cfg).state_dict(), weights)
    (weights.parent / "config.json").write_text(json.dumps(asdict(cfg)))
    assert register.main([f"weights={weights}", f"run_id={run_id}", f"tracking.uri={uri}"]) == 0
    assert "models:/later/1" in capsys.readouterr().out
    version = MlflowClient(uri).get_model_version("later", "1")
    assert version.run_id == run_id and version.tags["steps"] == str(cfg.trainer.max_steps)
    assert register.main([f"weights={tmp_path}/nope.pt", f"run_id={run_id}"]) == 2
    assert "config.json beside it" in capsys.readouterr().err
