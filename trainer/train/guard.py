"""The stability guard: watch the stability signals, and when one trips, roll every worker back
to the last healthy checkpoint and intervene (lower the learning rates, raise or add the
penalty, draw new latents), within a budget of rollbacks. A run's first non-finite trip is
taken for a transient fault: rolled back with new latents, without the other interventions.

The guard owns the run's current penalty: it starts as the config's, only the guard changes
it, checkpoints keep it in the guard's state, and the worker hands it to `GANStep.set_penalty`
after every restore.

Every rank holds a `Guard`. Rank 0 sees all signals (reduced step metrics and its probe) and
decides; the decision is broadcast, and every rank applies it, so ranks stay identical. A
checkpoint counts as healthy when no trigger fired since the one before it: the loop checks
before it saves (`trainer.checkpoint_every` is a multiple of `trainer.log_every`) and rolls
back instead of saving when a trigger fires, so every checkpoint it saves is healthy.

Triggers (`stability.guard` in the config; 0 turns one off):
- non-finite loss, gradient norm or metric;
- a loss explosion: |d_loss| or |g_loss| beyond `max_loss` at any check, the first included
  (the relative triggers below learn their baselines from the run itself, so a run that blows
  up in its first steps would teach them that this is normal);
- a loss spike: d_loss or g_loss beyond `loss_z` exponentially weighted standard deviations;
- D saturated: accuracy on reals and on fakes both at least `d_saturation` for
  `saturated_checks` checks in a row, after the first `WARMUP_CHECKS` checks;
- spectral blow-up: the top singular value of D beyond `sn_growth` x its first probe;
- collapse: diversity of a fixed latent batch below `coverage_drop` x its best;
- quality drop: the in-training FID (or FD with other features, `eval.every`) beyond
  `fid_rise` x its best.

Every trigger uses only what a user has on real data. The 2-D benchmarks' ground-truth mode
positions (modes covered, high quality) are logged for monitoring and never trip the guard.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainer.config import GuardConfig
from trainer.train.probe import EWStats

# Checks (of the step metrics) before the loss statistics are trusted and before a saturated D
# counts, at the start and again after a rollback: while G still draws noise, D classifying
# everything right is the expected state, not a failure (a DCGAN on digits sits at accuracy 1.0
# for its first ~50 steps).
WARMUP_CHECKS = 10
EVENT_COLUMNS = ["step", "trigger", "detail", "action", "rolled_back_to", "lr_scale", "penalty", "repeats"]


class Guard:
    """Trigger bookkeeping and the interventions applied so far (the same on every rank)."""

    def __init__(self, cfg: GuardConfig, penalty_kind: str, penalty_weight: float):
        self.cfg = cfg
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.penalty_kind, self.penalty_weight = penalty_kind, penalty_weight
        self.healthy: list[tuple[int, str]] = []  # (step, checkpoint folder), oldest first
        self.events: list[dict] = []
        self._last_target: str | None = None
        self._reset_watch()

    def _reset_watch(self) -> None:
        """Forget the running statistics (after a rollback they describe an abandoned branch)."""
        self.loss_stats = {"d_loss": EWStats(), "g_loss": EWStats()}
        self.saturated = 0
        self.checks = 0  # checks of the step metrics since the start or the last rollback
        self.best: dict[str, float] = {}
        self.sn_base: float | None = None

    # --- rank 0: what tripped ----------------------------------------------------------------

    def trigger(self, metrics: dict[str, float]) -> tuple[str, str] | None:
        """(trigger, detail) if the signals in `metrics` trip the guard, else None.

        `metrics` holds what was measured at this check: reduced step metrics at log steps,
        probe signals at probe steps, or both.
        """
        c = self.cfg
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if metrics.get("nonfinite", 0) > 0 or bad:
            return "nonfinite", f"{metrics.get('nonfinite', 0):.0f} non-finite values; {', '.join(bad[:4])}"
        if c.max_loss:
            for key in ("d_loss", "g_loss"):
                if abs(metrics.get(key, 0.0)) > c.max_loss:
                    return "loss_explosion", f"{key}={metrics[key]:.4g} beyond max_loss {c.max_loss:g}"
        if c.loss_z:
            for key, stats in self.loss_stats.items():
                if key in metrics:
                    mean, n = stats.mean, stats.n
                    z = stats.update(metrics[key])
                    # A spike is far out in both senses: the EW variance of interval means can
                    # be tiny, so a z-score alone trips on ordinary drift.
                    far = abs(metrics[key] - mean) > c.loss_rel * abs(mean)
                    if n >= WARMUP_CHECKS and abs(z) > c.loss_z and far:
                        return (
                            "loss_spike",
                            f"{key}={metrics[key]:.4g} is {z:+.1f} EW std from its mean {mean:.4g}",
                        )
        if c.saturated_checks and "d_acc_real" in metrics and "d_acc_fake" in metrics:
            self.checks += 1
            saturated = min(metrics["d_acc_real"], metrics["d_acc_fake"]) >= c.d_saturation
            saturated = saturated and self.checks > WARMUP_CHECKS
            self.saturated = self.saturated + 1 if saturated else 0
            if self.saturated >= c.saturated_checks:
                return "d_saturated", (
                    f"D accuracy real {metrics['d_acc_real']:.3f} / fake {metrics['d_acc_fake']:.3f} "
                    f"for {self.saturated} checks"
                )
        if c.sn_growth and "sn/D/max" in metrics:
            sigma = metrics["sn/D/max"]
            if self.sn_base is None:
                self.sn_base = sigma
            elif sigma > c.sn_growth * self.sn_base:
                return (
                    "sn_blowup",
                    f"top singular value of D {sigma:.3g} > {c.sn_growth} x {self.sn_base:.3g}",
                )
        if c.coverage_drop and "diversity" in metrics:
            value = metrics["diversity"]
            best = self.best["diversity"] = max(self.best.get("diversity", 0.0), value)
            if value < c.coverage_drop * best:
                return "collapse", f"diversity {value:.3g} < {c.coverage_drop} x best {best:.3g}"
        if c.fid_rise and "eval/fid" in metrics:
            value = metrics["eval/fid"]
            best = self.best["eval/fid"] = min(self.best.get("eval/fid", math.inf), value)
            if value > c.fid_rise * best:
                return "quality_drop", f"eval/fid {value:.4g} > {c.fid_rise} x best {best:.4g}"
        return None

    def plan(self, step: int, trigger: str, detail: str, usable: list[tuple[int, str]]) -> dict:
        """The event for a trigger at `step`: roll back to the newest usable healthy checkpoint
        (one older when the last rollback went to the same one and tripped again before a new
        checkpoint), or only record it once the budget is spent or nothing is usable."""
        event = {
            "step": step,
            "trigger": trigger,
            "detail": detail,
            "action": "recorded",
            "rolled_back_to": None,
        }
        if self.rollbacks >= self.cfg.max_rollbacks:
            event["action"] = f"recorded (budget of {self.cfg.max_rollbacks} rollbacks spent)"
            last = self.events[-1] if self.events else {}
            if last.get("trigger") == trigger and last.get("action") != "rollback":
                event["action"] = "repeat"  # the same trouble as at the last event: counted, not listed
            return event
        if usable and usable[-1][1] == self._last_target and len(usable) > 1:
            usable = usable[:-1]
        if not usable:
            event["action"] = "recorded (no healthy checkpoint to roll back to)"
            return event
        target_step, target = usable[-1]
        event["action"] = "rollback"
        event["rolled_back_to"] = target_step
        event["target"] = target
        return event

    # --- every rank: apply what rank 0 decided ----------------------------------------------

    def apply(self, event: dict) -> None:
        """Record `event`; for a rollback, count it and set the next interventions."""
        if event["action"] == "rollback":
            self.rollbacks += 1
            self._last_target = event["target"]
            self.healthy = [(s, p) for s, p in self.healthy if s <= event["rolled_back_to"]]
            if not self.transient(event):
                self.intervene()
            self._reset_watch()
        if event["action"] == "repeat":
            self.events[-1]["repeats"] = self.events[-1].get("repeats", 0) + 1
            return
        event = {k: v for k, v in event.items() if k != "target"}
        event["lr_scale"] = self.lr_scale
        event["penalty"] = f"{self.penalty_kind} {self.penalty_weight:g}"
        self.events.append(event)

    def transient(self, event: dict) -> bool:
        """A first non-finite trip is taken for a transient fault (a bad batch, a numeric
        accident): the rollback and new latents suffice, and lowering the learning rate would
        cost the rest of the run (the image drill's NaN batch: FD-digits 418 against the
        control's 68). Once one has been rolled back, the next is an instability."""
        earlier = any(e["trigger"] == "nonfinite" and e["action"] == "rollback" for e in self.events)
        return event["trigger"] == "nonfinite" and not earlier

    def intervene(self) -> None:
        """Lower both learning rates; raise the penalty, or add R1 to a run without one."""
        self.lr_scale *= self.cfg.lr_factor
        if self.penalty_kind == "none" and self.cfg.add_r1 > 0:
            self.penalty_kind, self.penalty_weight = "r1", self.cfg.add_r1
        elif self.penalty_kind != "none":
            self.penalty_weight *= self.cfg.penalty_factor

    def saved(self, step: int, path: str) -> None:
        """A checkpoint was saved with no trigger since the one before: it is healthy."""
        self.healthy.append((step, path))
        self._last_target = None  # a trip from here on rolls back to this one first

    def noise_seed(self, seed: int, rank: int) -> int:
        """Latent seed of each rank; after a rollback, new draws per rollback."""
        return (seed + 7919 * self.rollbacks) * 1_000_003 + rank + 1

    # --- persistence and reporting ----------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "budget_spent": any("budget" in e["action"] or e["action"] == "repeat" for e in self.events),
            "penalty_kind": self.penalty_kind,
            "penalty_weight": self.penalty_weight,
            "healthy": self.healthy,
            "events": self.events,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks, self.lr_scale = state["rollbacks"], state["lr_scale"]
        self.penalty_kind, self.penalty_weight = state["penalty_kind"], state["penalty_weight"]
        self.healthy = [(int(s), str(p)) for s, p in state["healthy"]]
        self.events = list(state["events"])

    def table(self) -> bytes:
        """The events as an MLflow table artifact (columns + rows, as `mlflow.log_table` writes)."""
        rows = [[e.get(c) for c in EVENT_COLUMNS] for e in self.events]
        return json.dumps({"columns": EVENT_COLUMNS, "data": rows}, indent=1).encode()

    def summary(self) -> dict:
        return {
            "rollbacks": self.rollbacks,
            "events": len(self.events),
            "triggers": sorted({e["trigger"] for e in self.events}),
            "lr_scale": self.lr_scale,
            "budget_spent": any("budget" in e["action"] or e["action"] == "repeat" for e in self.events),
            "penalty": f"{self.penalty_kind} {self.penalty_weight:g}",
        }


def usable_checkpoints(healthy: list[tuple[int, str]], world: int) -> list[tuple[int, str]]:
    """The healthy checkpoints still on disk with every rank's files intact (Ray keeps the
    last `trainer.keep_checkpoints`)."""
    from trainer.train import checkpoint

    out = []
    for step, path in healthy:
        try:
            checkpoint.verify(Path(path), expected_ranks=world)
        except checkpoint.CheckpointError:
            continue
        out.append((step, path))
    return out
