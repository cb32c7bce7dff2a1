"""The per-rank worker that Ray Train runs: restore -> step -> periodic tasks.

`Worker.restore` is the one way back to a checkpoint: a resume (Ray hands over a checkpoint) and
a guard rollback both go through it. Each periodic task owns its schedule (`Every`); the loop
in `Worker.run` only asks which are due. The worker knows nothing of MLflow: rank 0 is handed
a run logger (`trainer.services.tracking.RunLogger`) by the caller.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import ray.train
import torch
from ray.experimental import tqdm_ray

from data_pipeline import objstore
from data_pipeline.sources import MIXTURES
from data_pipeline.stream import ShardLoader, StreamConfig
from trainer.config import Config, from_dict
from trainer.eval.evaluator import Evaluator
from trainer.gan import schedule
from trainer.gan.ema import EMA
from trainer.gan.models import build_pair
from trainer.gan.schedule import EMADecay
from trainer.gan.step import GANStep
from trainer.train import checkpoint, plots, probe
from trainer.train.engines import Engine
from trainer.train.guard import Guard, usable_checkpoints
from trainer.train.meter import Meter, replica_drift

log = logging.getLogger("stablegan.worker")


class RunLog(Protocol):
    """What rank 0 logs through (`trainer.services.tracking.RunLogger`)."""

    skip_through: int
    dropped: int

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_bytes(self, data: bytes, artifact_file: str) -> None: ...
    def last_step(self, key: str) -> int: ...
    def close(self, timeout: float) -> int: ...


@dataclass(frozen=True)
class Every:
    """A periodic task's schedule: due every `n` steps (0 = never) and, with `last`, at the end."""

    n: int
    last: bool = False

    def due(self, step: int, max_steps: int) -> bool:
        return self.n > 0 and (step % self.n == 0 or (self.last and step == max_steps))


def build_models(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(G, D) as `cfg.model` describes them, freshly initialised from the global RNG."""
    return build_pair(cfg.model)


def build_engines(
    cfg: Config, device: torch.device, init: dict[str, str | None] | None = None
) -> tuple[Engine, Engine, EMA]:
    """G and D with identical initialisation on every rank, each in its own DeepSpeed engine;
    `init` (fine-tuning) names weight files to start G (and its EMA) and D from, loaded
    before the engines exist so their optimizers' master copies start from them too."""
    torch.manual_seed(cfg.trainer.seed)
    G, D = build_models(cfg)
    for net, key in ((G, "G"), (D, "D")):
        if init and init.get(key):
            net.load_state_dict(torch.load(init[key], weights_only=True))
    o, p, b = cfg.optim, cfg.parallel, cfg.data.batch_size
    g_engine = Engine(G.to(device), o.g_lr, (o.beta1, o.beta2), p, b, o.grad_clip)
    d_engine = Engine(D.to(device), o.d_lr, (o.beta1, o.beta2), p, b, o.grad_clip)
    images_per_step = b * cfg.trainer.num_workers
    ema = EMA(g_engine.module, EMADecay(o.ema_decay, o.ema_kimg, o.ema_rampup, images_per_step))
    return g_engine, d_engine, ema


def make_loader(cfg: Config, urls: str | list, rank: int, world: int) -> ShardLoader:
    """This rank's share of the shards, in the shape the model expects."""
    d, m = cfg.data, cfg.model
    expected = (2,) if m.arch == "mlp" else (m.channels, m.resolution, m.resolution)
    stream = StreamConfig(
        urls=urls,
        batch_size=d.batch_size,
        rank=rank,
        world_size=world,
        num_workers=d.loader_workers,
        seed=cfg.trainer.seed,
        shuffle=d.shuffle,
        resample=d.resample,
        hflip=d.hflip,
        verify=d.verify,
        expected_shape=expected,
        with_keys=d.audit,
        shuffle_buffer=d.shuffle_buffer,
        tar_reader=d.tar_reader,
        max_pixels=d.max_pixels,
        decoders=list(d.decoders),
        stages=list(d.stages),
    )
    return ShardLoader(stream)


@torch.no_grad()
def sample_picture(generator: torch.nn.Module, cfg: Config, step: int, seed: int = 0) -> bytes:
    """A PNG of samples from a fixed latent batch: an image grid, or a scatter over the modes."""
    num = cfg.tracking.sample_grid * (40 if cfg.model.arch == "mlp" else 1)
    z = torch.randn(num, cfg.model.latent_dim, generator=torch.Generator().manual_seed(seed))
    was_training = generator.training
    generator.eval()
    x = generator(z.to(next(generator.parameters()).device)).float().cpu()
    generator.train(was_training)
    if cfg.model.arch == "mlp":
        modes = MIXTURES[cfg.data.builtin][0]() if cfg.data.builtin in MIXTURES else None
        return plots.scatter_png(x.numpy(), modes, title=f"EMA generator, step {step}")
    return plots.grid_png(x)


def make_probe(cfg: Config, G: Engine, D: Engine, ema: EMA, gan: GANStep) -> probe.Probe:
    """The periodic stability probe on this rank's modules (2-D data: mode metrics)."""
    modes, sigma = None, 0.0
    if cfg.model.arch == "mlp" and cfg.data.builtin in MIXTURES and not cfg.data.urls:
        modes_fn, sigma = MIXTURES[cfg.data.builtin]
        modes = modes_fn()
    return probe.Probe(
        G.module,
        D.module,
        lambda: ema.module,
        cfg.model.latent_dim,
        gan.d_loss,
        gan.g_loss,
        modes=modes,
        sigma=sigma,
        num_samples=cfg.stability.samples,
        power_iters=cfg.stability.power_iters,
    )


def make_evaluator(cfg: Config, urls: str | list, device: torch.device) -> Evaluator:
    """Rank 0's evaluator for `eval.every`: `eval.during_num` samples against the same shards,
    KID over 10 subsets (100 cost most of the time), stacked digits' modes counted on as many
    samples: a trend to watch, not the end-of-run score."""
    n = cfg.eval.during_num
    opts = replace(cfg.eval, num=n, mode_samples=min(n, cfg.eval.mode_samples), kid_subsets=10)
    return Evaluator(urls, opts, str(device), progress=False)


def broadcast_from_rank0(obj: object, world: int) -> object:
    """Rank 0's `obj` on every rank (collective when world > 1)."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_audit(audit: dict[int, list[str]], rank: int, world: int) -> bytes:
    """Every rank's node and sample keys per epoch, gathered on all ranks, as gzipped JSON."""
    mine = {
        "rank": rank,
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "epochs": {str(e): keys for e, keys in sorted(audit.items())},
    }
    ranks: list = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    return gzip.compress(json.dumps({"ranks": ranks}).encode())


def cpu_seconds() -> float:
    """CPU seconds of this process, plus those of its children that have exited (loader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Worker:
    """One rank's training: its engines, data position, guard, probe and periodic tasks."""

    def __init__(
        self,
        cfg_dict: dict,
        data_urls: str | list,
        run_dir: str,
        logger: RunLog | None,
        progress_bar: bool = False,
        init: dict[str, str | None] | None = None,  # fine-tuning: weight files for G and D
    ) -> None:
        self.cpu_start = cpu_seconds()
        self.cfg_dict, self.cfg, self.run_dir = cfg_dict, from_dict(cfg_dict), run_dir
        cfg, t = self.cfg, self.cfg.trainer
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(t.torch_threads or t.cpus_per_worker)
        device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
        self.loader = make_loader(cfg, data_urls, self.rank, self.world)
        self.data_urls, self.device = data_urls, device
        self.evaluator: Evaluator | None = None  # rank 0, built at the first `eval.every` step
        self.G, self.D, self.ema = build_engines(cfg, device, init)
        guard = cfg.stability.guard
        if cfg.loss.kind == "wasserstein":  # a critic's values are unbounded: no absolute bound
            guard = replace(guard, max_loss=0.0)
        self.gamma = GANStep.gamma(cfg)  # the penalty weight as configured (`auto` resolved)
        self.guard = Guard(guard, cfg.penalty.kind, self.gamma)
        # Per-rank latents; a rollback may reseed them (guard.noise_seed counts rollbacks).
        self.noise = torch.Generator().manual_seed(self.guard.noise_seed(t.seed, self.rank))
        self.gan = GANStep(self.G, self.D, cfg, self.noise)
        self.logger = logger
        self.bar = None  # rank 0 with progress_bar: a live bar rendered by the driver (Ray's tqdm)
        self.progress_bar = progress_bar and logger is not None
        self.meter = Meter()
        self.probe = (
            make_probe(cfg, self.G, self.D, self.ema, self.gan)
            if self.rank == 0 and cfg.stability.every
            else None
        )
        self.schedule = {
            "log": Every(t.log_every, last=True),
            "probe": Every(cfg.stability.every, last=True),
            "sample": Every(t.sample_every),
            "eval": Every(cfg.eval.every if self.rank == 0 else 0),
            "checkpoint": Every(t.checkpoint_every, last=True),
        }
        self.history: dict[str, list[tuple[int, float]]] = {}  # rank 0: what was logged, for the summary
        self.audit: dict[int, list[str]] | None = {} if cfg.data.audit else None  # epoch -> keys read here
        self.last_metrics: dict[str, float] = {}
        self.unchecked: dict[str, float] = {}  # rank 0: evaluation metrics the guard has not seen
        self.poisoned = False  # trainer.inject_nan_at fires once per process
        self.step = 0
        self.batches = None
        self.batch: dict = {}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.images_done, self.tick, self.last_logged = 0, time.perf_counter(), self.step

    # ---- restore: resume and rollback ---------------------------------------------------------
    def restore(self, path: Path, with_guard_state: bool) -> None:
        """Continue from the checkpoint at `path` on this rank: engines, EMA, latent RNG, data
        position and the lazy-regularization phase. A resume also takes the guard's state from
        it; a rollback keeps the guard's own (its interventions and budget)."""
        self.step, data_state, extra = checkpoint.load(path, self.rank, self.G, self.D, self.ema, self.noise)
        self.loader.load_state_dict(data_state)
        if self.batches is not None:
            self.batches.close()  # stops the old DataLoader's workers
            self.batches = None
        if with_guard_state and "guard" in extra:
            self.guard.load_state_dict(extra["guard"])
        self.gan.augment.p = extra.get("augment_p", self.gan.augment.p)
        self.gan.d_iters = self.step * self.cfg.optim.d_steps  # as if never stopped
        self.gan.set_penalty(self.guard.penalty_kind, self.guard.penalty_weight)
        self.meter.clear()
        self._reset_counters()

    def resume(self, handed: Path) -> None:
        """Resume from the newest checkpoint of this run whose manifests verify (Ray may hand
        over an older one: it registers checkpoints asynchronously)."""
        chosen = checkpoint.latest_valid(handed, expected_ranks=self.world)
        if chosen is None:
            raise checkpoint.CheckpointError(
                f"no usable checkpoint in {handed.parent} (all fail their checksums): "
                "move the folder away to start over, or use another trainer.run_name"
            )
        self.restore(chosen, with_guard_state=True)
        self.guard.saved(self.step, str(chosen))
        if self.logger is not None:  # a resumed run does not log the steps it logged already
            self.logger.skip_through = self.logger.last_step("d_loss")
        log.warning("rank %d resumed from checkpoint at step %d", self.rank, self.step)

    def inherit(self, path: Path) -> None:
        """Population-based training's exploit: continue from another run's checkpoint (G, D,
        EMA, optimizers, data position, augmentation strength) under this run's own settings:
        the guard starts afresh, so the perturbed learning rates and penalty weight apply."""
        checkpoint.verify(path, self.world)
        self.restore(path, with_guard_state=False)
        log.warning("rank %d took over checkpoint %s at step %d", self.rank, path, self.step)

    def rollback(self, target: str) -> None:
        """The guard's rollback: restore `target`, new latents, and history cut to the branch that survives."""
        self.restore(Path(target), with_guard_state=False)
        if self.guard.cfg.reseed:
            self.noise.manual_seed(self.guard.noise_seed(self.cfg.trainer.seed, self.rank))
        if self.probe is not None:
            self.probe.reset()
        self.history = {k: [(s, v) for s, v in vs if s <= self.step] for k, vs in self.history.items()}
        if self.bar is not None:
            self.bar.n = self.step

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Train to `trainer.max_steps`, then log the final picture, CPU time and data audit."""
        t = self.cfg.trainer
        try:
            if self.cfg.stability.guard.enabled and self.step == 0 and not self.guard.healthy:
                # A healthy point to roll back to before the first check. Not again after a
                # resume from it: Ray Train would hold the folder twice and fail on pruning it.
                self.save_checkpoint({"step": 0})
            if self.progress_bar:
                self.bar = tqdm_ray.tqdm(desc=self.cfg.name, total=t.max_steps, unit="step")
                self.bar.n = self.step
            while self.step < t.max_steps:
                self.train_step()
                self.after_step()
            self.finish()
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.logger is not None:
                self.logger.close(timeout=self.cfg.tracking.flush_timeout)

    def train_step(self) -> None:
        """d_steps D updates, one G update, the EMA: one step."""
        cfg = self.cfg
        self.apply_schedules()
        for _ in range(cfg.optim.d_steps):
            self.batch = self.next_batch()
            self.meter.add(self.gan.d_step(self.batch["x"], self.batch.get("y")))
            self.images_done += len(self.batch["x"])
        self.meter.add(self.gan.g_step(cfg.data.batch_size, self.batch["x"], self.batch.get("y")))
        self.ema.update(self.G.module)
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)

    def apply_schedules(self) -> None:
        """This step's learning rates (schedule x the guard's scale), beta2 and penalty factor
        (`trainer.gan.schedule`), set on the engines only when one changed."""
        lr, beta2, penalty = schedule.at_step(self.cfg, self.gamma, self.step)
        lr *= self.guard.lr_scale
        if (lr, beta2, penalty) != (self.gan.lr_scale, self.gan.beta2, self.gan.penalty_scale):
            self.gan.set_hparams(lr, beta2, penalty)

    def next_batch(self) -> dict:
        """The next batch, recorded for the data audit; NaN once under `trainer.inject_nan_at`."""
        if self.batches is None:
            self.batches = iter(self.loader)
        batch = next(self.batches)
        if self.audit is not None:
            for epoch, key in batch["keys"]:
                self.audit.setdefault(int(epoch), []).append(key)
        if self.cfg.trainer.inject_nan_at == self.step + 1 and not self.poisoned:
            self.poisoned = True
            batch["x"] = torch.full_like(batch["x"], float("nan"))
            log.warning("rank %d: trainer.inject_nan_at=%d: this batch is all NaN", self.rank, self.step + 1)
        return batch

    def after_step(self) -> None:
        """The periodic tasks due at this step. The guard checks what was logged and probed
        before any checkpoint is saved, so every saved checkpoint is healthy; after a rollback
        the step's remaining tasks are skipped."""
        step, last = self.step, self.cfg.trainer.max_steps
        due = {name: every.due(step, last) for name, every in self.schedule.items()}
        checked = self.log_step() if due["log"] else {}
        if due["probe"] and self.probe is not None:
            checked = {**checked, **self.probe_step()}
        finite = all(math.isfinite(v) for v in checked.values()) and not checked.get("nonfinite")
        if due["eval"] and finite and not (step == last and self.cfg.eval.at_end):  # at_end: the driver's
            self.unchecked |= self.eval_step()  # before the guard, which reads eval/fid
        if self.cfg.stability.guard.enabled and (due["log"] or due["probe"]):
            checked, self.unchecked = {**checked, **self.unchecked}, {}
            if self.guard_step(checked):
                return
        if due["sample"] and self.logger is not None:
            self.logger.log_bytes(
                sample_picture(self.ema.module, self.cfg, step), f"samples/step_{step:07d}.png"
            )
        report: dict = {"step": step}
        if self.logger is not None:  # rank 0: what a sweep ranks and stops trials by, and where
            report |= self.verdict() | {"node": ray.util.get_node_ip_address()}
        if step == last and self.logger is not None and self.cfg.stability.summary:
            report["stability"] = json.dumps(self.write_summary())  # the driver turns it into run tags
        if due["checkpoint"]:
            self.save_checkpoint(report)

    # ---- periodic tasks -------------------------------------------------------------------------
    def log_step(self) -> dict[str, float]:
        """Reduce the interval's metrics over all ranks (collective) and log them on rank 0."""
        elapsed = max(time.perf_counter() - self.tick, 1e-9)
        metrics = self.meter.reduce()  # collective: every rank is here at the same step
        metrics["images_per_sec"] = self.images_done * self.world / elapsed
        metrics["replica_drift"] = replica_drift(self.G.module, self.D.module)
        metrics["data_skipped"] = float(self.loader.num_skipped)
        metrics["data_unreadable_shards"] = float(self.loader.skipped.get("unreadable_shard", 0))
        if self.cfg.parallel.precision == "fp16":
            metrics["d_loss_scale"], metrics["g_loss_scale"] = self.D.loss_scale, self.G.loss_scale
        if self.cfg.augment.kind == "ada" and "d_sign_real" in metrics:
            metrics["augment_p"] = self.gan.adapt(metrics["d_sign_real"], self.images_done * self.world)
        steps_per_sec = (self.step - self.last_logged) / elapsed
        self._reset_counters()
        self.last_metrics = metrics
        if self.logger is not None:
            metrics["tracking_dropped"] = float(self.logger.dropped)
            self.logger.log_metrics(metrics, self.step)
            self.record(metrics)
            self.show_progress(metrics, steps_per_sec)
        return metrics

    def show_progress(self, metrics: dict[str, float], steps_per_sec: float) -> None:
        """The losses on the live bar, or a line with the rate and ETA."""
        d, g = metrics.get("d_loss", float("nan")), metrics.get("g_loss", float("nan"))
        if self.bar is not None:
            self.bar.set_description(f"{self.cfg.name}  d_loss {d:.3f}  g_loss {g:.3f}")
            return
        t = self.cfg.trainer
        eta = (t.max_steps - self.step) / max(steps_per_sec, 1e-9)
        log.warning(
            "step %d/%d  d_loss %.3f  g_loss %.3f  %.0f img/s  eta %.0fs",
            *(self.step, t.max_steps, d, g, metrics["images_per_sec"], eta),
        )

    def probe_step(self) -> dict[str, float]:
        """Rank 0's stability probe on the last batch."""
        signals = self.probe(self.batch["x"], self.last_metrics)
        self.record(signals)
        if self.logger is not None:
            self.logger.log_metrics(signals, self.step)
        return signals

    def eval_step(self) -> dict[str, float]:
        """Rank 0 scores the EMA generator (`eval.every`); the other ranks wait for it at their
        next collective. A failure is logged and turns the evaluation off, never the training."""
        start = time.perf_counter()
        try:
            if self.evaluator is None:
                self.evaluator = make_evaluator(self.cfg, self.cfg.eval.urls or self.data_urls, self.device)
            result = self.evaluator(self.ema.module, self.cfg.model.latent_dim)
        except Exception:  # noqa: BLE001 - evaluation is an observer: training goes on
            log.exception("evaluation at step %d failed; eval.every is off for this run", self.step)
            self.schedule["eval"] = Every(0)
            return {}
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        metrics["eval_seconds"] = time.perf_counter() - start
        self.record(metrics)
        if self.logger is not None:
            self.logger.log_metrics(metrics, self.step)
        self.tick += metrics["eval_seconds"]  # images/s measures training, not evaluation
        return metrics

    def guard_step(self, checked: dict[str, float]) -> bool:
        """Rank 0 decides, every rank applies (collective); True if this step was rolled back."""
        event = None
        if self.rank == 0:
            tripped = self.guard.trigger(checked)
            if tripped is not None:
                event = self.guard.plan(
                    self.step, *tripped, usable_checkpoints(self.guard.healthy, self.world)
                )
        event = broadcast_from_rank0(event, self.world)  # collective: the same decision everywhere
        if event is None:
            return False
        self.guard.apply(event)
        if self.logger is not None and event["action"] != "repeat":
            log.warning("stability guard: %s", json.dumps(self.guard.events[-1]))
            self.logger.log_metrics({"guard_rollbacks": self.guard.rollbacks}, self.step)
            self.logger.log_bytes(self.guard.table(), "guard/events.json")
        if event["action"] != "rollback":
            return False
        self.rollback(event["target"])
        return True

    def verdict(self) -> dict[str, float]:
        """Rank 0's latest evaluation values (a non-finite one as inf) and whether the run has
        diverged so far: the stability summary's test, or a loss in the last log non-finite or
        beyond the guard's `max_loss` (whether or not the guard is on)."""
        latest = {k: v[-1][1] for k, v in self.history.items() if k.startswith("eval/") and v}
        latest = {k: v if math.isfinite(v) else math.inf for k, v in latest.items()}
        bound = self.guard.cfg.max_loss or math.inf  # 0 (off, and always for wasserstein): none
        losses = [abs(self.last_metrics.get(k, 0.0)) for k in ("d_loss", "g_loss")]
        blown = not all(v <= bound for v in losses)  # NaN compares False: blown too
        diverged = probe.summarize(self.history)["diverged"] or blown
        return latest | {"diverged": float(diverged)}

    def write_summary(self) -> dict:
        """Rank 0's end-of-run stability summary: stability.json and stability.png."""
        summary = probe.summarize(self.history)
        if self.cfg.stability.guard.enabled:
            summary["guard"] = self.guard.summary()
        self.logger.log_bytes(
            json.dumps({"summary": summary, "history": self.history}).encode(), "stability.json"
        )
        self.logger.log_bytes(plots.report_png(self.history, summary, self.cfg.name), "stability.png")
        log.warning("stability summary: %s", json.dumps(summary))
        return summary

    def save_checkpoint(self, report: dict) -> None:
        """This rank's checkpoint, reported to Ray Train; the guard learns it is healthy."""
        # After a rollback, steps repeat: the suffix keeps the new branch's folders apart.
        name = f"checkpoint_{self.step:08d}" + (f"-r{self.guard.rollbacks}" if self.guard.rollbacks else "")
        state = (self.step, self.noise, self.loader.state_dict(), self.cfg_dict)
        extra = {"guard": self.guard.state_dict(), "augment_p": self.gan.augment.p}
        if objstore.is_s3(self.cfg.trainer.storage_path):
            # Ray uploads it; the local copy is what a rollback reads back (and a resume on
            # this machine). The newest `keep_checkpoints` copies are kept, as in the bucket.
            folder = Path(self.run_dir) / name
            checkpoint.save(folder, self.rank, self.G, self.D, self.ema, *state, extra=extra)
            ckpt = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=name)
            for old in sorted(Path(self.run_dir).glob("checkpoint_*"))[: -self.cfg.trainer.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint.save(Path(tmp), self.rank, self.G, self.D, self.ema, *state, extra=extra)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=name)
        self.guard.saved(self.step, str(Path(self.run_dir) / name))

    def record(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((self.step, float(v)))

    def finish(self) -> None:
        """The final sample picture and CPU time (rank 0), and the data audit (collective)."""
        if self.logger is not None:
            self.logger.log_bytes(sample_picture(self.ema.module, self.cfg, self.step), "samples/final.png")
            # CPU time of rank 0's worker process (all its threads) since the worker started,
            # beside MLflow's wall time (which also holds Ray's start): the benchmarks report both.
            self.logger.log_metrics({"train_cpu_seconds": cpu_seconds() - self.cpu_start}, self.step)
        if self.audit is not None:
            gathered = gather_audit(self.audit, self.rank, self.world)  # collective: every rank calls it
            if self.logger is not None:
                self.logger.log_bytes(gathered, "data_audit.json.gz")
