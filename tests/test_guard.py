"""The stability guard's decisions: triggers, rollback targets, interventions, budget, state."""

from __future__ import annotations

import json
import math

import pytest

from trainer.config import GuardConfig
from trainer.train.guard import EVENT_COLUMNS, WARMUP_CHECKS, Guard

HEALTHY = {"d_loss": 1.3, "g_loss": 0.8, "d_acc_real": 0.6, "d_acc_fake": 0.55, "nonfinite": 0.0}


def warm(guard: Guard, n: int = 10) -> None:
    """A few healthy checks with a little noise, so the loss statistics have a variance."""
    for i in range(n):
        assert guard.trigger({**HEALTHY, "d_loss": 1.3 + 0.01 * (-1) ** i}) is None


def test_healthy_signals_do_not_trip():
    guard = Guard(GuardConfig(enabled=True), "r1", 0.1)
    warm(guard, 30)
    assert guard.trigger({"sn/D/max": 3.0, "diversity": 0.9, "eval/fid": 40.0}) is None
    assert guard.trigger({"sn/D/max": 3.5, "diversity": 0.95, "eval/fid": 30.0}) is None
    # g_loss never moved, so +6 % is a huge z-score; but it is drift, not a spike.
    assert guard.trigger({**HEALTHY, "g_loss": 0.85}) is None


@pytest.mark.parametrize(
    "signals,trigger",
    [
        ({**HEALTHY, "nonfinite": 3.0}, "nonfinite"),
        ({**HEALTHY, "d_loss": math.nan}, "nonfinite"),
        ({"grad/D/total": math.inf}, "nonfinite"),
        ({**HEALTHY, "g_loss": 9.0}, "loss_spike"),
    ],
)
def test_each_trigger(signals, trigger):
    guard = Guard(GuardConfig(enabled=True), "r1", 0.1)
    warm(guard)
    tripped = guard.trigger(signals)
    assert tripped is not None and tripped[0] == trigger


def test_a_loss_explosion_trips_from_the_first_check():
    """A run that blows up in its first steps (lr 1e-2 on stacked digits: d_loss 28 at step 50,
    1,083 at step 250) would teach the relative triggers that this is normal."""
    guard = Guard(GuardConfig(enabled=True), "none", 0.0)
    assert guard.trigger({**HEALTHY, "d_loss": 28.2}) == ("loss_explosion", "d_loss=28.2 beyond max_loss 20")
    assert (
        Guard(GuardConfig(enabled=True), "none", 0.0).trigger({**HEALTHY, "g_loss": -25.0})[0]
        == "loss_explosion"
    )
    assert Guard(GuardConfig(enabled=True), "none", 0.0).trigger({**HEALTHY, "g_loss": 12.0}) is None
    assert (
        Guard(GuardConfig(enabled=True, max_loss=0), "none", 0.0).trigger({**HEALTHY, "d_loss": 500.0})
        is None
    )


def test_saturation_needs_consecutive_checks_after_the_warm_up():
    guard = Guard(GuardConfig(enabled=True, saturated_checks=3, loss_z=0), "none", 0.0)
    saturated = {**HEALTHY, "d_acc_real": 0.999, "d_acc_fake": 0.995}
    # While G draws noise D is right about everything: no trip in the first WARMUP_CHECKS checks.
    assert [guard.trigger(saturated) for _ in range(WARMUP_CHECKS)] == [None] * WARMUP_CHECKS
    assert guard.trigger(saturated) is None and guard.trigger(saturated) is None
    assert guard.trigger(HEALTHY) is None  # the run of saturated checks is broken
    assert guard.trigger(saturated) is None and guard.trigger(saturated) is None
    assert guard.trigger(saturated)[0] == "d_saturated"


def test_spectral_blowup_collapse_and_quality_drop_are_relative():
    guard = Guard(GuardConfig(enabled=True, sn_growth=10.0, coverage_drop=0.5, fid_rise=2.0), "r1", 0.1)
    assert guard.trigger({"sn/D/max": 2.0, "diversity": 0.96, "eval/fid": 30.0}) is None
    assert guard.trigger({"sn/D/max": 19.0, "diversity": 0.5, "eval/fid": 59.0}) is None
    assert guard.trigger({"sn/D/max": 21.0})[0] == "sn_blowup"
    assert guard.trigger({"diversity": 0.47})[0] == "collapse"
    assert guard.trigger({"eval/fid": 61.0})[0] == "quality_drop"
    off = Guard(GuardConfig(enabled=True, sn_growth=0, coverage_drop=0, fid_rise=0), "r1", 0.1)
    assert off.trigger({"sn/D/max": 1.0, "diversity": 0.96, "eval/fid": 10.0}) is None
    assert off.trigger({"sn/D/max": 100.0, "diversity": 0.01, "eval/fid": 1e4}) is None


def test_ground_truth_modes_never_trip_the_guard():
    """2-D benchmarks know their modes; a user's data does not. Coverage of the true modes is
    monitoring: only signals computed from samples and real data trip the guard."""
    guard = Guard(GuardConfig(enabled=True, coverage_drop=0.5), "r1", 0.1)
    assert guard.trigger({"modes_covered": 25.0, "high_quality": 0.9, "diversity": 1.0}) is None
    assert guard.trigger({"modes_covered": 1.0, "high_quality": 0.01, "diversity": 0.9}) is None


def test_fid_rise_must_be_a_factor_above_one():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="stability.guard.fid_rise=0.5 is invalid.*0 for off"):
        GuardConfig(enabled=True, fid_rise=0.5).check()


def test_rollback_interventions_and_target_choice():
    guard = Guard(GuardConfig(enabled=True, lr_factor=0.5, add_r1=0.1, max_rollbacks=3), "none", 0.0)
    for step in (0, 250, 500):
        guard.saved(step, f"/runs/x/checkpoint_{step:08d}")
    usable = list(guard.healthy)

    first = guard.plan(640, "loss_spike", "z", usable)
    assert first["action"] == "rollback" and first["rolled_back_to"] == 500
    guard.apply(first)
    assert (guard.rollbacks, guard.lr_scale, guard.penalty_kind, guard.penalty_weight) == (1, 0.5, "r1", 0.1)

    # Tripped again before a new checkpoint: the one it went back to was already bad: go older.
    second = guard.plan(600, "collapse", "modes", [c for c in usable if c[0] <= 500])
    assert second["rolled_back_to"] == 250
    guard.apply(second)
    assert guard.healthy == usable[:2]  # the abandoned branch's checkpoints no longer count
    assert guard.lr_scale == 0.25 and guard.penalty_weight == pytest.approx(0.2)  # raised, not re-added

    # A new healthy checkpoint on the new branch becomes the first target again.
    guard.saved(500, "/runs/x/checkpoint_00000500-r2")
    third = guard.plan(700, "loss_spike", "z", guard.healthy)
    assert third["rolled_back_to"] == 500 and third["target"].endswith("-r2")
    guard.apply(third)

    # Budget spent: later trips are recorded, once per run of the same trigger.
    for step in (800, 900, 1000):
        guard.apply(guard.plan(step, "loss_spike", "z", guard.healthy))
    assert guard.rollbacks == 3
    assert [e["action"] for e in guard.events][3:] == ["recorded (budget of 3 rollbacks spent)"]
    assert guard.events[-1]["repeats"] == 2

    table = json.loads(guard.table())
    assert table["columns"] == EVENT_COLUMNS and len(table["data"]) == 4
    assert [row[4] for row in table["data"]] == [500, 250, 500, None]
    assert guard.summary()["triggers"] == ["collapse", "loss_spike"]


def test_a_first_nan_is_a_transient_fault_and_a_second_an_instability():
    """The first non-finite trip rolls back with new latents only (a bad batch should not cost
    the rest of the run a halved lr); another one after it intervenes as any trigger does."""
    guard = Guard(GuardConfig(enabled=True, lr_factor=0.5), "r1", 1.0)
    guard.saved(500, "/c500")
    seed = guard.noise_seed(0, 0)
    guard.apply(guard.plan(600, "nonfinite", "NaN", guard.healthy))
    assert (guard.rollbacks, guard.lr_scale, guard.penalty_weight) == (1, 1.0, 1.0)
    assert guard.noise_seed(0, 0) != seed  # new latents all the same
    guard.saved(750, "/c750")
    guard.apply(guard.plan(800, "nonfinite", "NaN", guard.healthy))
    assert (guard.rollbacks, guard.lr_scale, guard.penalty_weight) == (2, 0.5, 2.0)
    assert [e["lr_scale"] for e in guard.events] == [1.0, 0.5]


def test_nothing_to_roll_back_to_is_recorded_not_crashed():
    guard = Guard(GuardConfig(enabled=True), "r1", 1.0)
    event = guard.plan(50, "nonfinite", "NaN", [])
    guard.apply(event)
    assert event["action"].startswith("recorded (no healthy checkpoint") and guard.rollbacks == 0


def test_state_round_trip_keeps_interventions():
    guard = Guard(GuardConfig(enabled=True), "r1", 1.0)
    guard.saved(100, "/c100")
    guard.apply(guard.plan(150, "loss_spike", "z", guard.healthy))
    state = json.loads(json.dumps(guard.state_dict()))  # what a checkpoint stores
    again = Guard(GuardConfig(enabled=True), "r1", 1.0)
    again.load_state_dict(state)
    assert again.state_dict() == guard.state_dict()
    assert (again.lr_scale, again.penalty_weight, again.rollbacks) == (0.5, 2.0, 1)
    assert again.noise_seed(0, 1) != Guard(GuardConfig(), "r1", 1.0).noise_seed(0, 1)
