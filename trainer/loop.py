"""The per-worker training loop that Ray Train runs on every rank."""

from __future__ import annotations

import gzip
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import ray.train
import torch

from data_pipeline.sources import MIXTURES
from data_pipeline.stream import ShardLoader, StreamConfig
from trainer import checkpoint, stability, tracking
from trainer.config import Config, from_dict
from trainer.ema import EMA
from trainer.engines import Engine
from trainer.guard import Guard, usable_checkpoints
from trainer.metrics import Meter, replica_drift
from trainer.models import build_pair
from trainer.step import GANStep

log = logging.getLogger("stablegan.loop")


def build_models(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(G, D) as `cfg.model` describes them, freshly initialised from the global RNG."""
    m = cfg.model
    return build_pair(
        m.arch,
        m.latent_dim,
        resolution=m.resolution,
        channels=m.channels,
        g_width=m.g_width,
        d_width=m.d_width,
        depth=m.depth,
        spectral_norm=m.spectral_norm,
        mbstd_group=m.mbstd_group,
        g_experts=m.g_experts,
        g_expert_prior=m.g_expert_prior,
    )


def build_engines(cfg: Config, device: torch.device) -> tuple[Engine, Engine, EMA]:
    """G and D with identical initialisation on every rank, each in its own DeepSpeed engine."""
    torch.manual_seed(cfg.trainer.seed)
    G, D = build_models(cfg)
    o, p, b = cfg.optim, cfg.parallel, cfg.data.batch_size
    g_engine = Engine(G.to(device), o.g_lr, (o.beta1, o.beta2), p, b, o.grad_clip)
    d_engine = Engine(D.to(device), o.d_lr, (o.beta1, o.beta2), p, b, o.grad_clip)
    return g_engine, d_engine, EMA(g_engine.module, o.ema_decay)


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
        return tracking.scatter_png(x.numpy(), modes, title=f"EMA generator, step {step}")
    return tracking.grid_png(x)


def record(history: dict[str, list[tuple[int, float]]], metrics: dict[str, float], step: int) -> None:
    for k, v in metrics.items():
        history.setdefault(k, []).append((step, float(v)))


def make_probe(cfg: Config, G: Engine, D: Engine, ema: EMA, gan: GANStep) -> stability.Probe:
    """The periodic stability probe on this rank's modules (2-D data: mode metrics)."""
    modes, sigma = None, 0.0
    if cfg.model.arch == "mlp" and cfg.data.builtin in MIXTURES and not cfg.data.urls:
        modes_fn, sigma = MIXTURES[cfg.data.builtin]
        modes = modes_fn()
    return stability.Probe(
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


def train_loop(config: dict) -> None:
    """Ray Train entry point: `config` holds the resolved config, shard URLs and run id."""
    cpu_start = cpu_seconds()
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.trainer.torch_threads or cfg.trainer.cpus_per_worker)
    device = ray.train.torch.get_device() if cfg.trainer.use_gpu else torch.device("cpu")

    expected = (
        (2,) if cfg.model.arch == "mlp" else (cfg.model.channels, cfg.model.resolution, cfg.model.resolution)
    )
    d = cfg.data
    loader = ShardLoader(
        StreamConfig(
            urls=config["data_urls"],
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
        )
    )
    audit: dict[int, list[str]] | None = {} if d.audit else None  # epoch -> sample keys read here
    G, D, ema = build_engines(cfg, device)
    guard = Guard(cfg.stability.guard, cfg.penalty.kind, cfg.penalty.weight)
    noise = torch.Generator().manual_seed(guard.noise_seed(cfg.trainer.seed, rank))  # per-rank latents
    step = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        # storage_path is a shared filesystem, so the checkpoint's path is a local folder.
        chosen = checkpoint.latest_valid(Path(restored.path), expected_ranks=world)
        if chosen is None:
            raise checkpoint.CheckpointError(
                f"no usable checkpoint in {Path(restored.path).parent} (all fail their checksums): "
                "move the folder away to start over, or use another trainer.run_name"
            )
        step, data_state, extra = checkpoint.load(chosen, rank, G, D, ema, noise)
        loader.load_state_dict(data_state)
        if "guard" in extra:
            guard.load_state_dict(extra["guard"])
        guard.saved(step, str(chosen))
        log.warning("rank %d resumed from checkpoint at step %d", rank, step)

    logger = tracking.RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if logger is not None and restored is not None:
        # A resumed run continues its MLflow run: steps it already logged are not logged twice.
        logger.skip_through = logger.last_step("d_loss")
    gan = GANStep(G, D, cfg, noise)
    gan.d_iters = step * cfg.optim.d_steps  # the lazy-regularization phase, as if never stopped
    gan.set_penalty(guard.penalty_kind, guard.penalty_weight)
    meter = Meter()
    probe = make_probe(cfg, G, D, ema, gan) if rank == 0 and cfg.stability.every else None
    history: dict[str, list[tuple[int, float]]] = {}  # rank 0: what was logged, for the summary
    last_metrics: dict[str, float] = {}
    t = cfg.trainer
    guarded = cfg.stability.guard.enabled
    poisoned = False  # trainer.inject_nan_at fires once per process

    def save_checkpoint(report: dict) -> None:
        # After a rollback, steps repeat: the suffix keeps the new branch's folders apart.
        name = f"checkpoint_{step:08d}" + (f"-r{guard.rollbacks}" if guard.rollbacks else "")
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(
                Path(tmp),
                rank,
                G,
                D,
                ema,
                step,
                noise,
                loader.state_dict(),
                config["cfg"],
                extra={"guard": guard.state_dict()},
            )
            ray.train.report(
                report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )
        guard.saved(step, str(Path(config["run_dir"]) / name))

    if guarded and step == 0:
        save_checkpoint({"step": 0})  # a healthy point to roll back to before the first interval

    batches = iter(loader)
    images_done, tick = 0, time.perf_counter()
    last_logged = step
    try:
        while step < t.max_steps:
            scale = guard.lr_scale * (1.0 - step / t.max_steps if cfg.optim.lr_schedule == "linear" else 1.0)
            if scale != gan.lr_scale:
                gan.set_lr_scale(scale)
            for _ in range(cfg.optim.d_steps):
                batch = next(batches)
                if audit is not None:
                    for epoch, key in batch["keys"]:
                        audit.setdefault(int(epoch), []).append(key)
                if t.inject_nan_at == step + 1 and not poisoned:
                    poisoned = True
                    batch["x"] = torch.full_like(batch["x"], float("nan"))
                    log.warning("rank %d: trainer.inject_nan_at=%d: this batch is all NaN", rank, step + 1)
                meter.add(gan.d_step(batch["x"]))
                images_done += len(batch["x"])
            meter.add(gan.g_step(d.batch_size))
            ema.update(G.module)
            step += 1

            checked: dict[str, float] = {}  # what the guard looks at on this step
            log_step = step % t.log_every == 0 or step == t.max_steps
            if log_step:
                elapsed = time.perf_counter() - tick
                metrics = meter.reduce()  # collective: every rank is here at the same step
                metrics["images_per_sec"] = images_done * world / max(elapsed, 1e-9)
                metrics["replica_drift"] = replica_drift(G.module, D.module)
                metrics["data_skipped"] = float(loader.num_skipped)
                metrics["data_unreadable_shards"] = float(loader.skipped.get("unreadable_shard", 0))
                if cfg.parallel.precision == "fp16":
                    metrics["d_loss_scale"], metrics["g_loss_scale"] = D.loss_scale, G.loss_scale
                images_done, tick = 0, time.perf_counter()
                steps_per_sec = (step - last_logged) / max(elapsed, 1e-9)
                last_logged = step
                last_metrics = checked = metrics
                if logger is not None:
                    metrics["tracking_dropped"] = float(logger.dropped)
                    logger.log_metrics(metrics, step)
                    record(history, metrics, step)
                    log.warning(
                        "step %d/%d  d_loss %.3f  g_loss %.3f  %.0f img/s  eta %.0fs",
                        step,
                        t.max_steps,
                        metrics.get("d_loss", float("nan")),
                        metrics.get("g_loss", float("nan")),
                        metrics["images_per_sec"],
                        (t.max_steps - step) / max(steps_per_sec, 1e-9),
                    )
            probe_step = bool(cfg.stability.every) and (
                step % cfg.stability.every == 0 or step == t.max_steps
            )
            if probe is not None and probe_step:
                signals = probe(batch["x"], last_metrics)
                checked = {**checked, **signals}
                record(history, signals, step)
                if logger is not None:
                    logger.log_metrics(signals, step)
            if guarded and (log_step or probe_step):
                event = None
                if rank == 0:
                    tripped = guard.trigger(checked)
                    if tripped is not None:
                        usable = usable_checkpoints(guard.healthy, world)
                        event = guard.plan(step, *tripped, usable)
                event = broadcast_from_rank0(event, world)  # collective: the same decision everywhere
                if event is not None:
                    guard.apply(event)
                    if logger is not None and event["action"] != "repeat":
                        log.warning("stability guard: %s", json.dumps(guard.events[-1]))
                        logger.log_metrics({"guard_rollbacks": guard.rollbacks}, step)
                        logger.log_bytes(guard.table(), "guard/events.json")
                    if event["action"] == "rollback":
                        step, data_state, _ = checkpoint.load(Path(event["target"]), rank, G, D, ema, noise)
                        loader.load_state_dict(data_state)
                        batches.close()  # stops the old DataLoader's workers
                        batches = iter(loader)
                        gan.d_iters = step * cfg.optim.d_steps
                        gan.set_penalty(guard.penalty_kind, guard.penalty_weight)
                        if guard.cfg.reseed:
                            noise.manual_seed(guard.noise_seed(cfg.trainer.seed, rank))
                        meter.clear()
                        images_done, tick, last_logged = 0, time.perf_counter(), step
                        if probe is not None:
                            probe.reset()
                        # The summary describes the branch that survives.
                        history = {k: [(s, v) for s, v in vs if s <= step] for k, vs in history.items()}
                        continue
            if logger is not None and t.sample_every and step % t.sample_every == 0:
                logger.log_bytes(sample_picture(ema.module, cfg, step), f"samples/step_{step:07d}.png")
            report: dict = {"step": step}
            if step == t.max_steps and logger is not None and cfg.stability.summary:
                summary = stability.summarize(history)
                if guarded:
                    summary["guard"] = guard.summary()
                logger.log_bytes(
                    json.dumps({"summary": summary, "history": history}).encode(), "stability.json"
                )
                logger.log_bytes(stability.report_png(history, summary, cfg.name), "stability.png")
                log.warning("stability summary: %s", json.dumps(summary))
                report["stability"] = json.dumps(summary)  # the driver turns it into run tags
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                save_checkpoint(report)
        if logger is not None:
            logger.log_bytes(sample_picture(ema.module, cfg, step), "samples/final.png")
            # CPU time of rank 0's worker process (all its threads) while this function ran,
            # beside MLflow's wall time (which also holds Ray's start): the benchmarks report both.
            logger.log_metrics({"train_cpu_seconds": cpu_seconds() - cpu_start}, step)
        if audit is not None:
            gathered = gather_audit(audit, rank, world)  # collective: every rank calls it
            if logger is not None:
                logger.log_bytes(gathered, "data_audit.json.gz")
    finally:
        if logger is not None:
            logger.close(timeout=cfg.tracking.flush_timeout)
