"""Sweeps on Ray Tune (trainer/services/sweep.py, space.py): the search space checked before
anything starts, and a real sweep of tiny grid25 runs on the embedded Ray: a diverging lr
stopped and flagged, a too-small lr stopped early by ASHA, the driver killed midway and the
same command resuming it, the best config written, trained again and registered once."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_module
from trainer.config import ConfigError
from trainer.main import compose
from trainer.services.space import Dimension, parse_space, with_values
from trainer.services.sweep import best_row, changed, searcher, settle_from_runs


def test_the_shipped_spaces_parse():
    for group, keys in (
        ("lr", {"optim.g_lr", "optim.d_lr"}),
        ("lr_gamma", {"optim.g_lr", "optim.d_lr", "penalty.weight"}),
    ):
        cfg = compose(["experiment=grid25", f"tune={group}"])
        dims = parse_space(cfg.tune.space, cfg)
        assert {d.key for d in dims} == keys
        assert all(d.kind == "loguniform" and d.log_scale() for d in dims)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optim.g_rate": "uniform(0.1, 0.2)"}, "unknown key 'optim.g_rate'; keys of optim: .*g_lr"),
        ({"optimizer.g_lr": "uniform(0.1, 0.2)"}, "unknown key 'optimizer.g_lr'"),
        ({"optim": "choice(1, 2)"}, "unknown key 'optim'"),
        ({"stability.guard": "choice(1, 2)"}, "'stability.guard' is a section"),
        ({"tune.num_samples": "grid(1, 2)"}, "belongs to the sweep"),
        ({"trainer.run_name": "choice('a', 'b')"}, "belongs to the sweep"),
        ({"optim.g_lr": "gaussian(0, 1)"}, "not a distribution"),
        ({"optim.g_lr": "loguniform(1e-2, 1e-4)"}, "needs low < high"),
        ({"optim.g_lr": "loguniform(0, 1e-2)"}, "needs low > 0"),
        ({"optim.g_lr": "uniform(1e-4)"}, "takes two finite numbers"),
        ({"model.g_width": "randint(8.5, 64)"}, "randint takes integers"),
        ({"optim.g_lr": "choice()"}, "needs at least one value"),
        ({"optim.g_lr": "grid(1e-3, 3.0)"}, "the value 3.0 fails: optim.g_lr=3.0 is invalid"),
        ({"loss.kind": "choice('hinge', 'hinj')"}, "the value 'hinj' fails: loss.kind='hinj' is invalid"),
        ({}, "tune.space is empty"),
    ],
)
def test_a_bad_space_is_named_before_anything_starts(space, message):
    cfg = compose(["experiment=grid25"])
    with pytest.raises(ConfigError, match=message):
        parse_space(space, cfg)


def test_a_good_space_becomes_tune_domains():
    cfg = compose(["experiment=grid25"])
    dims = parse_space(
        {
            "optim.g_lr": "loguniform(1e-4, 1e-2)",
            "trainer.seed": "grid(1, 2, 3)",
            "model.g_width": "randint(64, 129)",
        },
        cfg,
    )
    by_key = {d.key: d for d in dims}
    assert by_key["trainer.seed"].domain() == {"grid_search": [1, 2, 3]}
    assert by_key["model.g_width"].probes() == [64, 128]  # Ray's randint leaves out its upper end
    lr = by_key["optim.g_lr"].domain()
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert not by_key["trainer.seed"].log_scale() and Dimension("k", "grid", (1e-3, 1e-1)).log_scale()


def test_tied_keys_take_one_value():
    cfg = compose(["experiment=grid25"])
    (dim,) = parse_space({"optim.g_lr+optim.d_lr": "grid(1e-4, 2e-3)"}, cfg)
    both = with_values(asdict(cfg), {dim.key: 2e-3})
    assert (both.optim.g_lr, both.optim.d_lr) == (2e-3, 2e-3)
    with pytest.raises(ConfigError, match="unknown key 'optim.e_lr'"):
        parse_space({"optim.g_lr+optim.e_lr": "grid(1e-4)"}, cfg)


def trial_configs(tune_cfg, dims: tuple) -> list[dict]:
    """The configs Tune's generator hands out for this space, in its order."""
    from ray import tune

    tune.register_trainable("stablegan-test-noop", lambda _config: None)
    gen = searcher(tune_cfg, dims, max_concurrent=0)
    gen.add_configurations(
        {
            "x": {
                "run": "stablegan-test-noop",
                "config": {d.key: d.domain() for d in dims},
                "num_samples": tune_cfg.num_samples,
            }
        }
    )
    configs = []
    while (trial := gen.next_trial()) is not None:
        configs.append(trial.config)
    return configs


def test_grid_points_run_in_a_seeded_shuffled_order_each_as_often_as_asked():
    """ASHA judges a trial only against those before it: a grid walked as written (here worst lr
    first) would pass every trial, so the points come shuffled, each num_samples times, with the
    other dimensions drawn for each; tune.shuffle=false keeps the written order."""
    from dataclasses import replace

    cfg = compose(["experiment=grid25"])
    space = {"optim.g_lr+optim.d_lr": "grid(1e-4, 3e-4, 1e-3, 3e-3)", "penalty.weight": "grid(0.1, 1.0)",
             "optim.beta1": "uniform(0.0, 0.5)"}  # fmt: skip
    dims = tuple(parse_space(space, cfg))
    tied = "optim.g_lr+optim.d_lr"
    twice = replace(cfg.tune, num_samples=2, seed=0)
    configs = trial_configs(twice, dims)
    points = [(c[tied], c["penalty.weight"]) for c in configs]
    assert len(points) == 16 and all(points.count(p) == 2 for p in points)
    assert len({c["optim.beta1"] for c in configs}) == 16  # drawn for each trial
    written = trial_configs(replace(twice, shuffle=False), dims)
    assert sorted(points) == sorted((c[tied], c["penalty.weight"]) for c in written)
    assert [(c[tied], c["penalty.weight"]) for c in written[:2]] == [(1e-4, 0.1), (3e-4, 0.1)]
    assert points != [(c[tied], c["penalty.weight"]) for c in written]
    assert [(c[tied], c["penalty.weight"]) for c in trial_configs(twice, dims)] == points  # seeded
    other = [(c[tied], c["penalty.weight"]) for c in trial_configs(replace(twice, seed=1), dims)]
    assert other != points


def test_the_best_trial_is_one_that_ran_to_its_end():
    rows = [
        {"trial": "a", "eval/mmd": 0.01, "ended": "stopped early"},  # better, but judged early
        {"trial": "b", "eval/mmd": 0.001, "ended": "diverged"},
        {"trial": "c", "eval/mmd": 0.3, "ended": "completed"},
        {"trial": "d", "eval/mmd": 0.2, "ended": "completed"},
        {"trial": "e", "eval/mmd": float("nan"), "ended": "completed"},
    ]
    assert best_row(rows, "eval/mmd")["trial"] == "d"
    assert best_row(rows[:2], "eval/mmd") is None


def test_a_trial_whose_final_run_finished_counts_as_completed():
    """Tune's last result for a PBT leader can predate its run's end; a FINISHED final run (one
    that concluded) settles the row with that run's last evaluation, a killed one does not."""
    rows = [
        {"trial": "a", "step": 100, "eval/mmd": 0.5, "ended": "stopped early"},
        {"trial": "b", "step": 100, "eval/mmd": 0.1, "ended": "stopped early"},
        {"trial": "c", "step": 150, "eval/mmd": 0.3, "ended": "completed"},
    ]
    last = {
        "a": {"status": "FINISHED", "metrics": {"eval/mmd": 0.2, "d_loss": 1.0}},
        "b": {"status": "KILLED", "metrics": {"eval/mmd": 0.05}},
    }
    settle_from_runs(rows, last, 150, "eval/mmd")
    assert rows[0] == {"trial": "a", "step": 150, "eval/mmd": 0.2, "ended": "completed"}
    assert rows[2]["trial"] == "b" and rows[2]["ended"] == "stopped early"
    assert best_row(rows, "eval/mmd")["trial"] == "a"


def test_the_best_config_holds_what_differs_and_nothing_of_the_machine():
    values = {"optim": {"g_lr": 0.5, "beta1": 0.5}, "tracking": {"uri": "sqlite:///x", "experiment": "e"}}
    defaults = {"optim": {"g_lr": 0.1, "beta1": 0.5}, "tracking": {"uri": "", "experiment": "stablegan"}}
    assert changed(values, defaults) == {"optim": {"g_lr": 0.5}, "tracking": {"experiment": "e"}}


def test_the_best_config_composes_back_to_the_best_trial(tmp_path):
    """A value equal to the schema's default but not to the default groups' (penalty.weight=1
    under penalty=r1_light's 0.1) must be written, or the preset would train something else."""
    from trainer.services.sweep import write_best_config
    from trainer.services.trial import SweepSpec

    best = compose(["experiment=grid25", "penalty.weight=1.0", "optim.g_lr=0.003", "trainer.max_steps=77"])
    spec = SweepSpec("s", str(tmp_path), {}, (), "eval/mmd", "", "")
    path = write_best_config(best, tmp_path, spec, {"trial": "t", "eval/mmd": 0.1, "step": 77})
    again = compose([f"experiment={path}"])
    assert (again.penalty.weight, again.optim.g_lr, again.trainer.max_steps) == (1.0, 0.003, 77)
    assert again.name == "s-best" and again.model == best.model and again.optim == best.optim


def test_experiment_takes_a_preset_file(tmp_path):
    (tmp_path / "experiment").mkdir()
    preset = tmp_path / "experiment" / "mine.yaml"
    preset.write_text("# @package _global_\nname: mine\noptim:\n  g_lr: 0.0042\n")
    cfg = compose([f"experiment={preset}"])
    assert (cfg.name, cfg.optim.g_lr) == ("mine", 0.0042)
    loose = tmp_path / "loose.yaml"
    loose.write_text(preset.read_text())
    with pytest.raises(ConfigError, match="must lie in a folder named 'experiment'"):
        compose([f"experiment={loose}"])
    with pytest.raises(ConfigError, match="no such file"):
        compose([f"experiment={tmp_path / 'none.yaml'}"])


def test_the_robustness_report_pools_seeds_per_setting(tmp_path):
    from trainer.services import sweep_report as report

    condition = report.parse_condition("eval/modes>=990")
    assert condition == ("eval/modes", ">=", 990.0)
    rows = [
        {"optim.g_lr": 1e-3, "trainer.seed": 1, "eval/fid": 10.0, "eval/modes": 995.0, "ended": "completed"},
        {"optim.g_lr": 1e-3, "trainer.seed": 2, "eval/fid": 14.0, "eval/modes": 980.0, "ended": "completed"},
        {
            "optim.g_lr": 3e-3,
            "trainer.seed": 1,
            "eval/fid": 2.0,
            "eval/modes": 999.0,
            "ended": "stopped early",
        },
        {"optim.g_lr": 3e-3, "trainer.seed": 2, "eval/fid": math.inf, "eval/modes": 0.0, "ended": "diverged"},
    ]
    assert report.summary(rows, "eval/fid", condition)["converged"] == "1 of 4 (eval/modes>=990.0)"
    text = report.write_report(
        rows, ["optim.g_lr", "trainer.seed"], "eval/fid", condition, tmp_path, "t"
    ).read_text()
    assert "| 0.001 | 2 | 1 of 2 | 12 ± 2.8 | 0 | 0 |" in text
    assert "| 0.003 | 2 | 0 of 2 | n/a | 1 | 1 |" in text
    with pytest.raises(ConfigError, match="write METRIC OP VALUE"):
        report.parse_condition("modes >= 990")


def test_a_sweep_refuses_what_it_cannot_keep():
    with pytest.raises(ConfigError, match="tune.storage_path='s3://b/tune': a sweep keeps its state"):
        compose(["experiment=grid25", "tune.storage_path=s3://b/tune"])
    with pytest.raises(
        ConfigError, match="tune.metric='fid' is invalid: a sweep ranks trials by an in-training"
    ):
        compose(["experiment=grid25", "tune.metric=fid"])


# ---- a real sweep ---------------------------------------------------------------------------


def sweep_args(tmp_path: Path) -> list[str]:
    """Three tiny grid25 trials one at a time: a good lr, one too small to move G in 50 steps,
    one that blows D's loss up at once."""
    return [
        "experiment=grid25",
        "trainer.max_steps=150",
        "trainer.checkpoint_every=50",
        "trainer.log_every=50",
        "data.batch_size=64",
        "eval.during_num=1000",
        'tune.space={optim.g_lr: "grid(1e-3, 1e-7, 0.9)"}',
        "tune.grace_steps=50",
        "tune.reduction_factor=2",
        "tune.max_concurrent=1",
        "tune.shuffle=false",  # the good lr first: ASHA stops the tiny one against it
        f"tune.storage_path={tmp_path / 'tune'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "cluster.num_cpus=2",
    ]


def run_tune(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python -m trainer.tune ARGS` to its end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "trainer.tune", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def finished_in_state(state_dir: Path) -> int:
    """How many trials Tune's saved experiment state holds as TERMINATED."""
    count = 0
    for path in state_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue
        count = max(count, sum('"TERMINATED"' in t[0] for t in trials))
    return count


@pytest.mark.slow
def test_a_sweep_stops_bad_trials_resumes_and_writes_its_best(tmp_path):
    import mlflow

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its state every second
    args = sweep_args(tmp_path)
    root = tmp_path / "tune" / "tune-grid25"

    first = start_module("trainer.tune", args, env)
    deadline = time.time() + 300
    # Killed once the good trial and the one ASHA stops are done (a restored sweep's scheduler
    # starts without the rung values of trials before it), the diverging one still to come.
    while finished_in_state(root / "tuner") < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver (and its embedded Ray) stopped midway
    log = first.communicate()[0]
    assert finished_in_state(root / "tuner") >= 2, log[-3000:]
    first_trial = next((root / "trials").glob("tune-grid25-*_00000"))
    kept = {p.name: p.stat().st_mtime for p in first_trial.glob("checkpoint_*")}

    again = run_tune(args, env)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "resuming sweep tune-grid25" in out
    assert {p.name: p.stat().st_mtime for p in first_trial.glob("checkpoint_*")} == kept  # not rerun

    rows = {r["optim.g_lr"]: r for r in csv_rows(root / "trials.csv")}
    assert rows["0.001"]["ended"] == "completed" and rows["0.001"]["step"] == "150"
    assert rows["0.9"]["ended"] == "diverged" and int(rows["0.9"]["step"]) < 150  # stopped at once
    assert rows["1e-07"]["ended"] == "stopped early" and int(rows["1e-07"]["step"]) < 150  # by ASHA
    assert "trials: 3 (1 completed, 1 stopped early, 1 diverged, 0 failed)" in out

    best = Path(
        next(line.split(": ", 1)[1] for line in out.splitlines() if line.strip().startswith("best_config:"))
    )
    cfg = compose([f"experiment={best}"])  # checked and composed as `python -m trainer.main` does
    assert (cfg.optim.g_lr, cfg.trainer.max_steps, cfg.tracking.uri) == (0.001, 150, "")

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.info.run_name == "tune-grid25")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3  # the resumed sweep made no second run of any trial
    ends = {
        r.data.tags["tune.optim.g_lr"]: (r.info.status, r.data.tags.get("stablegan.sweep_end"))
        for r in children
    }
    assert ends["0.001"] == ("FINISHED", "completed")
    assert ends["0.9"][1] == "diverged" and ends["1e-07"] == ("KILLED", "stopped early")
    versions = client.search_model_versions("name='stablegan-generator'")
    assert len(versions) == 1 and versions[0].run_id == next(
        r.info.run_id for r in children if r.data.tags["tune.optim.g_lr"] == "0.001"
    )
    assert (
        client.get_model_version_by_alias("stablegan-generator", "candidate").version == versions[0].version
    )


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_pbt_hands_a_leaders_checkpoint_to_the_lagging_trial(tmp_path):
    """Two grid25 trials, one with an lr too small to learn: at a perturbation step it takes the
    other's checkpoint over (its copy holds the leader's weights bit for bit), continues under
    its own settings, and its lineage names the leader and the step."""
    import mlflow

    from trainer.train.checkpoint import load_parameters

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    replaced = ("tune.space=", "tune.max_concurrent=")
    args = [
        *(a for a in sweep_args(tmp_path) if not a.startswith(replaced)),
        'tune.space={optim.g_lr: "grid(1e-3, 1e-7)"}',
        "tune.scheduler=pbt",
        "tune.perturbation_steps=50",
        "tune.max_concurrent=2",
        "tracking.register=false",
    ]
    done = run_tune(args, env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    root = tmp_path / "tune" / "tune-grid25"
    rows = {r["trial"][-5:]: r for r in csv_rows(root / "trials.csv")}  # its lr is perturbed
    leader = rows["00000"]["trial"]
    assert rows["00000"]["lineage"] == ""
    # the leader, paused while the laggard took its checkpoint, still ran to its end
    assert rows["00000"]["ended"] == "completed" and rows["00000"]["step"] == "150"
    assert rows["00001"]["lineage"].startswith(f"{leader}@")  # took the leader's weights over
    assert rows["00001"]["ended"] == "completed" and rows["00001"]["step"] == "150"

    copies = sorted((root / "trials").glob("tune-grid25-*_00001-*/inherited_checkpoint_*"))
    assert copies, "no inherited checkpoint"
    for copy in copies:
        original = next((root / "trials").glob(f"tune-grid25-{leader}")) / copy.name.removeprefix(
            "inherited_"
        )
        if original.is_dir():  # the leader keeps its newest few
            ours, theirs = load_parameters(copy), load_parameters(original)
            assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    lagging = [r for r in runs if r.data.tags.get("stablegan.trial", "").endswith("_00001")]
    assert len(lagging) >= 2  # its first run, then one per takeover
    last = max(lagging, key=lambda r: r.info.start_time)
    chain = json.loads(last.data.tags["stablegan.lineage"])
    assert chain[-1]["trial"] == leader and chain[-1]["step"] % 50 == 0
    assert last.info.status == "FINISHED"
    handed = [r for r in lagging if r.info.run_id != last.info.run_id]
    assert all(r.data.tags["stablegan.sweep_end"].startswith("handed over") for r in handed)
