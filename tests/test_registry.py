"""The registry promotes only better generators, and anyone can pull the champion.

Against a real `mlflow server`: versions carry their evaluation, `candidate` moves to each new
one, `champion` only to a better one (or by hand, with a reason); a clean environment with
torch and mlflow alone samples from `models:/NAME@champion`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.make_shards import MakeShardsConfig, write_shards
from tests.test_evaluation import Copies, Noise, real_images
from trainer import evaluate, promote
from trainer.config import EvalConfig, RegistryConfig
from trainer.eval.evaluator import Evaluator
from trainer.services import promotion, tracking

GOOD = {
    "eval.fid": "2.0",
    "eval.features": "digits:a",
    "eval.data_sha256": "d1",
    "eval.num_real": "500",
    "eval.num_fake": "500",
    "eval.seed": "0",
    "stability.flags": "",
    "stability.summary": "true",
}


def tags(**kw: str) -> dict[str, str]:
    return {**GOOD, **{k.replace("_", ".", 1): v for k, v in kw.items()}}


@pytest.mark.parametrize(
    "cand, champ, cfg, promoted, reason",
    [
        (GOOD, None, RegistryConfig(), True, "no champion yet"),
        (tags(eval_fid="1.0"), GOOD, RegistryConfig(), True, "fid 1 beats the champion's 2"),
        (tags(eval_fid="3.0"), GOOD, RegistryConfig(), False, "fid 3 does not beat the champion's 2"),
        (tags(eval_fid="1.95"), GOOD, RegistryConfig(min_improvement=0.05), False, "by 5%"),
        (tags(eval_fid="1.0", stability_flags="diverged"), GOOD, RegistryConfig(), False, "stability flags"),
        (tags(eval_fid="nan"), GOOD, RegistryConfig(), False, "no finite fid"),
        (tags(eval_fid="1.0", eval_data_sha256="d2"), GOOD, RegistryConfig(), False, "not comparable"),
        (tags(eval_fid="1.0", eval_features="inception:b"), GOOD, RegistryConfig(), False, "not comparable"),
        (
            tags(eval_kid="0.1", eval_fid="9"),
            tags(eval_kid="0.2"),
            RegistryConfig(primary="kid"),
            True,
            "kid",
        ),
    ],
)
def test_decide(cand, champ, cfg, promoted, reason):
    d = promotion.decide(cand, champ, cfg, champion_version="1" if champ else None)
    assert d.promote is promoted and reason in d.reason


@pytest.mark.parametrize(
    "cand, champ, cfg, promoted, reason",
    [
        # Scores of another size or latent seed are another measurement: never compared.
        (
            tags(eval_fid="1.0", eval_num_fake="2000"),
            GOOD,
            RegistryConfig(),
            False,
            "num_fake 500 (champion) vs 2000",
        ),
        (
            tags(eval_fid="1.0", eval_num_real="2000"),
            GOOD,
            RegistryConfig(),
            False,
            "not comparable: num_real",
        ),
        (
            tags(eval_fid="1.0", eval_seed="7"),
            GOOD,
            RegistryConfig(),
            False,
            "not comparable: seed 0 (champion) vs 7",
        ),
        (tags(eval_fid="1.0"), {**GOOD, "eval.seed": ""}, RegistryConfig(), False, "records no seed"),
        (tags(eval_fid="1.0", eval_data_sha256=""), GOOD, RegistryConfig(), False, "has no identity"),
        # No stability summary (stability=off): no flag could have been raised.
        (
            tags(eval_fid="1.0", stability_summary="false"),
            GOOD,
            RegistryConfig(),
            False,
            "no stability summary",
        ),
        (tags(stability_summary="false"), None, RegistryConfig(), False, "no stability summary"),
        # A negative KID (its unbiased estimate can be): the bar is 5 % of |h| lower, not higher.
        (
            tags(eval_kid="-0.0098"),
            tags(eval_kid="-0.01"),
            RegistryConfig("kid", 0.05),
            False,
            "does not beat",
        ),
        (tags(eval_kid="-0.0106"), tags(eval_kid="-0.01"), RegistryConfig("kid", 0.05), True, "beats"),
    ],
)
def test_the_gate_cannot_be_fooled(cand, champ, cfg, promoted, reason):
    d = promotion.decide(cand, champ, cfg, champion_version="1" if champ else None)
    assert d.promote is promoted and reason in d.reason, d.reason
    assert promotion.decide(cand, champ, cfg, "1" if champ else None, force="checked").promote


def test_decide_2d_uses_mmd_and_force_overrides_everything():
    pts = {**GOOD, "eval.features": "points", "eval.mmd": "0.02", "eval.swd": "0.5"}
    worse = {**pts, "eval.mmd": "0.03", "eval.swd": "0.1"}
    assert promotion.decide(worse, pts, RegistryConfig(), "1").metric == "mmd"
    assert not promotion.decide(worse, pts, RegistryConfig(), "1").promote
    forced = promotion.decide(
        {**worse, "stability.flags": "diverged"}, pts, RegistryConfig(), "1", "checked by eye"
    )
    assert forced.promote and "forced by hand: checked by eye" in forced.reason


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    out = []
    for shard_size in (400, 600):  # the same digits, another manifest: another data hash
        d = tmp_path_factory.mktemp(f"digits{shard_size}")
        write_shards(MakeShardsConfig(source="digits", out=str(d), shard_size=shard_size), progress=False)
        out.append(str(d))
    return out


def register(uri: str, run_id: str, G: torch.nn.Module, name: str, ev: Evaluator | None, **extra: str) -> str:
    version = tracking.register_generator(
        uri, run_id, G, 8, name,
        {"dataset": ev.shards.urls[0].rsplit("/", 1)[0] if ev else "", "stability.summary": "true", **extra},
        ("candidate",),
    )  # fmt: skip
    if ev is not None:
        result = ev(G, 8)
        tracking.log_evaluation(uri, name, version, result.metrics, result.info)
    return version


@pytest.mark.slow
def test_champion_moves_only_to_a_better_generator_on_a_real_server(mlflow_server, two_datasets, capsys):
    from mlflow.tracking import MlflowClient

    uri, name = mlflow_server, "promo"
    data, other = two_datasets
    run_id, _ = tracking.start_run(uri, "promo", "promo-run", {})
    ev = Evaluator(data, EvalConfig(features="digits", num=500), progress=False)
    bank = real_images(data, 1797)
    cfg = RegistryConfig()
    client = MlflowClient(uri)

    v1 = register(uri, run_id, Noise(), name, ev)
    assert promotion.promote(uri, name, v1, cfg, "champion").promote  # the first one
    v2 = register(uri, run_id, Copies(bank), name, ev)
    d = promotion.promote(uri, name, v2, cfg, "champion")
    assert d.promote and d.champion_version == v1 and d.candidate < d.champion
    v3 = register(uri, run_id, Noise(), name, ev)
    d = promotion.promote(uri, name, v3, cfg, "champion")
    assert not d.promote and "does not beat" in d.reason
    assert tracking.alias_version(uri, name, "champion") == v2
    assert tracking.alias_version(uri, name, "candidate") == v3  # candidate moves every time
    version = client.get_model_version(name, v3)
    assert (
        version.tags["promotion.decision"] == "kept champion"
        and "does not beat" in version.tags["promotion.reason"]
    )
    assert float(version.tags["eval.fid"]) > float(client.get_model_version(name, v2).tags["eval.fid"])
    assert version.tags["eval.num_fake"] == "500" and version.tags["eval.features"].startswith("digits:")
    # ... and as model metrics of the logged model behind the version
    assert {m.key for m in client.get_logged_model(version.tags["logged_model_id"]).metrics} >= {
        "eval/fid",
        "eval/recall",
    }

    # A better generator that diverged is not promoted.
    v4 = register(uri, run_id, Copies(bank), name, ev, **{"stability.flags": "diverged"})
    assert "stability flags (diverged)" in promotion.promote(uri, name, v4, cfg, "champion").reason
    # Evaluated on other data: not comparable, the champion stays.
    v5 = register(uri, run_id, Copies(bank), name, Evaluator(other, EvalConfig(features="digits", num=500)))
    d = promotion.promote(uri, name, v5, cfg, "champion")
    assert not d.promote and "not comparable" in d.reason
    assert tracking.alias_version(uri, name, "champion") == v2

    # By hand: trainer.promote re-evaluates both on one dataset, then decides; force overrides.
    base = [f"tracking.uri={uri}", f"data.urls={data}", "eval.num=500", "eval.features=digits"]
    assert promote.main([f"model=models:/{name}/{v5}", *base]) == 0
    out = capsys.readouterr().out
    assert f"evaluated v{v5}" in out  # its stored evaluation was on the other data
    assert "does not beat" in out  # the same memorizer as v2: equal, not better
    assert tracking.alias_version(uri, name, "champion") == v2
    assert promote.main([f"model=models:/{name}/{v3}", "force=true", *base]) == 2  # no reason given
    assert promote.main([f"model=models:/{name}/{v3}", "force=true", "reason=drill", *base]) == 0
    assert tracking.alias_version(uri, name, "champion") == v3
    assert "forced by hand: drill" in client.get_model_version(name, v3).tags["promotion.reason"]

    # trainer.evaluate: prints the version's and the data's rows and logs to the version.
    assert evaluate.main([f"model=models:/{name}@champion", *base]) == 0
    out = capsys.readouterr().out
    assert "real data" in out and "fid" in out and "precision" in out


@pytest.mark.slow
def test_a_clean_environment_without_stablegan_pulls_the_champion(mlflow_server, tmp_path):
    """torch + mlflow only (installed fresh), loading by alias with both MLflow loaders."""
    from trainer.config import Config
    from trainer.services.conclude import build_generator

    cfg = Config()
    cfg.model.arch, cfg.model.channels = "dcgan", 1
    cfg.model.latent_dim, cfg.model.g_width = 16, 16
    torch.manual_seed(0)
    run_id, _ = tracking.start_run(mlflow_server, "pull", "pull-run", {})
    version = tracking.register_generator(
        mlflow_server, run_id, build_generator(cfg), 16, "pull", {}, ("champion",)
    )
    assert version == "1"
    env_dir = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    versions = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={_version('mlflow')}"]
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", *versions], capture_output=True, text=True, timeout=1200
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    snippet = Path(__file__).with_name("pull_snippet.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    done = subprocess.run(
        [str(py), str(snippet), "models:/pull@champion", "16"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "stablegan importable: False" in done.stdout
    assert "pytorch: (8, 1, 32, 32) in [-1, 1]" in done.stdout
    assert "pyfunc: (8, 1, 32, 32) in [-1, 1]" in done.stdout


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _race(uri: str, name: str, monkeypatch) -> list[promotion.Decision]:
    """v1 (fid 3) is champion; v2 (fid 2) and v3 (fid 1) are promoted from two threads at once,
    each decision taking a second between reading the champion and moving the alias."""
    import threading

    run_id, _ = tracking.start_run(uri, name, f"{name}-run", {})
    versions = [
        tracking.register_generator(uri, run_id, Noise(), 8, name, {**GOOD, "eval.fid": fid, "eval.key": "k"})
        for fid in ("3.0", "2.0", "1.0")
    ]
    assert promotion.promote(uri, name, versions[0], RegistryConfig(), "champion").promote
    slow_decide = promotion.decide

    def deciding_slowly(*args, **kwargs):
        time.sleep(1.0)
        return slow_decide(*args, **kwargs)

    monkeypatch.setattr(promotion, "decide", deciding_slowly)
    decisions: dict[str, promotion.Decision] = {}
    start = threading.Barrier(2)

    def run(version: str) -> None:
        start.wait()
        decisions[version] = promotion.promote(uri, name, version, RegistryConfig(), "champion")

    threads = [threading.Thread(target=run, args=(v,)) for v in versions[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    monkeypatch.setattr(promotion, "decide", slow_decide)
    return [decisions[v] for v in versions[1:]]


@pytest.mark.slow
def test_two_promotions_at_once_cannot_both_win_against_a_stale_champion(mlflow_server, monkeypatch):
    import contextlib

    from mlflow.tracking import MlflowClient

    # Without the lock the race is real: both read v1 as champion and both "win" against it.
    with monkeypatch.context() as m:
        m.setattr(tracking, "registry_lock", lambda uri, name: contextlib.nullcontext())
        unlocked = _race(mlflow_server, "race-unlocked", monkeypatch)
    assert [(d.promote, d.champion_version) for d in unlocked] == [(True, "1"), (True, "1")]
    # With it, the second decision reads the first one's result.
    v2, v3 = _race(mlflow_server, "race", monkeypatch)
    assert tracking.alias_version(mlflow_server, "race", "champion") == "3"
    assert sorted([v2.champion_version, v3.champion_version]) != ["1", "1"]
    if v2.champion_version == "3":  # v3 went first: v2 lost against it
        assert not v2.promote and "does not beat" in v2.reason and v3.promote
    else:  # v2 went first and won against v1; v3 then beat v2
        assert v2.promote and v3.promote and v3.champion_version == "2"
    names = [m.name for m in MlflowClient(mlflow_server).search_registered_models()]
    assert not any(n.endswith(tracking.LOCK_SUFFIX) for n in names)  # released


@pytest.mark.slow
def test_the_gate_holds_on_a_real_server(mlflow_server, two_datasets, capsys):
    """The ways the gate used to be fooled, on a real server: a quick small-sample evaluation
    of the champion no longer moves its bar; a score with another sample count is not
    compared; a run without a stability summary is not promoted; trainer.promote re-scores
    under one key, and then the better generator wins."""
    import json

    uri, name = mlflow_server, "gate"
    data, _ = two_datasets
    run_id, _ = tracking.start_run(uri, "gate", "gate-run", {})
    ev = Evaluator(data, EvalConfig(features="digits", num=500), progress=False)
    bank = real_images(data, 1797)
    v1 = register(uri, run_id, Noise(), name, ev)
    assert promotion.promote(uri, name, v1, RegistryConfig(), "champion").promote

    def scores(version: str) -> dict[str, str]:  # what promotion compares, records aside
        tags = tracking.version_tags(uri, name, version)
        return {k: x for k, x in tags.items() if k.startswith("eval.") and not k.startswith("eval.record.")}

    before = scores(v1)
    base = [f"tracking.uri={uri}", f"data.urls={data}", "eval.features=digits"]
    assert evaluate.main([f"model=models:/{name}/{v1}", "eval.num=100", *base]) == 0
    out = capsys.readouterr().out
    assert "recorded as evaluation 2 of the version" in out and "promotion scores are unchanged" in out
    assert scores(v1) == before and before["eval.num_fake"] == "500"
    assert json.loads(tracking.version_tags(uri, name, v1)["eval.record.2"])["info"]["num_fake"] == "100"

    few = Evaluator(data, EvalConfig(features="digits", num=200), progress=False)
    v2 = register(uri, run_id, Copies(bank), name, few)
    d = promotion.promote(uri, name, v2, RegistryConfig(), "champion")
    assert not d.promote and "not comparable: num_real 500 (champion) vs 200" in d.reason
    v3 = register(uri, run_id, Copies(bank), name, ev, **{"stability.summary": "false"})
    d = promotion.promote(uri, name, v3, RegistryConfig(), "champion")
    assert not d.promote and "no stability summary" in d.reason
    assert tracking.alias_version(uri, name, "champion") == v1

    assert promote.main([f"model=models:/{name}/{v2}", "eval.num=500", *base]) == 0
    out = capsys.readouterr().out
    assert f"evaluated v{v2}" in out and "moved champion" in out
    assert tracking.alias_version(uri, name, "champion") == v2
    assert scores(v2)["eval.key"] == scores(v1)["eval.key"]
