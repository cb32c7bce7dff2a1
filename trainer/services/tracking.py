"""Everything MLflow: runs, buffered metrics, sample pictures, the model registry.

The only module that imports mlflow. Workers never block on the server: `RunLogger` queues
metrics and artifacts in memory and a background thread sends them, retrying with backoff
while the server is unreachable; past `max_buffered` metrics the oldest are dropped and
counted (reported in the `tracking_dropped` metric and at close).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

RUN_NAME_TAG = "stablegan.run_name"
RECORD_TAG = "eval.record."  # eval.record.N: every evaluation of a version, in order
log = logging.getLogger("stablegan.tracking")


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with the user:password part of every URI in it replaced by `***`: what is printed,
    logged or stored as a run parameter never carries credentials."""
    return _USERINFO.sub("***@", text)


def redacted(config: dict) -> dict:
    """A nested config with every string value redacted."""
    return {
        k: redacted(v) if isinstance(v, dict) else redact(v) if isinstance(v, str) else v
        for k, v in config.items()
    }


def resolve_uri(uri: str) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def check_server(uri: str, timeout: float = 10.0) -> None:
    """For an http(s) tracking URI, one quick request to /health: MLflow's own client would
    retry an unreachable server for minutes before failing."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answers (e.g. auth in front of the server): let MLflow talk to it
    except OSError as exc:
        raise ConnectionError(f"no MLflow server answers ({getattr(exc, 'reason', exc)})") from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; a character MLflow refuses in a key (a search space's
    `optim.g_lr+optim.d_lr`) becomes '/'."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = re.sub(r"[^\w\-. :/]", "/", f"{prefix}{k}")
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def start_run(
    uri: str, experiment: str, run_name: str, config: dict, artifact_location: str = ""
) -> tuple[str, bool]:
    """Create the run for `run_name`, or find it again when a run of that name is resumed.

    Returns (run_id, resumed). Params (the flattened config) and the config artifact are
    logged once, when the run is created.
    """
    import mlflow

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = artifact_location or None
        if location is None and uri.startswith("sqlite:///"):
            # Absolute, so Ray workers running in other folders write to the same place.
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    config = redacted(config)
    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    client.log_dict(run.info.run_id, config, "config/resolved.yaml")
    return run.info.run_id, False


def end_run(uri: str, run_id: str, status: str = "FINISHED", tags: dict | None = None) -> None:
    client = _client(uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, str(v))
    client.set_terminated(run_id, status=status)


def child_runs(uri: str, experiment: str, parent_id: str) -> list[dict]:
    """Every run whose MLflow parent is `parent_id`, oldest first: id, name, status, tags and
    the latest value of each metric."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["start_time ASC"],
    )
    return [
        {
            "id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "tags": r.data.tags,
            "metrics": r.data.metrics,
        }
        for r in found
    ]


class RunLogger:
    """Buffered, retrying metric/artifact sender for one run (used by rank 0)."""

    def __init__(self, uri: str, run_id: str, max_buffered: int = 200_000):
        # Our thread retries; MLflow's own retries would hold a request for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = _client(uri)
        self.run_id = run_id
        self.max_buffered = max_buffered
        self._metrics: deque = deque()
        self._artifacts: deque = deque()
        self._cv = threading.Condition()
        self._closing = False
        self.dropped = 0
        self.send_failures = 0
        self.skip_through = 0  # metrics at steps <= this were logged before a resume: not again
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if step <= self.skip_through:
            return
        with self._cv:
            for k, v in metrics.items():
                self._metrics.append(Metric(k, float(v), now, step))
            while len(self._metrics) > self.max_buffered:
                self._metrics.popleft()
                self.dropped += 1
            self._cv.notify()

    def last_step(self, key: str) -> int:
        """The last step at which `key` was logged to this run (0 if none or unreachable)."""
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception as exc:  # noqa: BLE001 - unknown: better a duplicate step than no metrics
            log.warning("cannot read the run's metric history (%s); replayed steps may repeat", exc)
            return 0

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        with self._cv:
            self._artifacts.append((data, artifact_file))
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._metrics) + len(self._artifacts)

    def _send_one_batch(self) -> bool:
        with self._cv:
            batch = [self._metrics[i] for i in range(min(1000, len(self._metrics)))]
            artifact = self._artifacts[0] if self._artifacts else None
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
            with self._cv:
                for _ in batch:
                    self._metrics.popleft()
        if artifact is not None:
            data, name = artifact
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(name).name
                path.write_bytes(data)
                self.client.log_artifact(
                    self.run_id, str(path), str(Path(name).parent) if "/" in name else None
                )
            with self._cv:
                self._artifacts.popleft()
        return bool(batch or artifact)

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._metrics and not self._artifacts and not self._closing:
                    self._cv.wait(timeout=1.0)
                if self._closing and not self._metrics and not self._artifacts:
                    return
            try:
                self._send_one_batch()
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - server down or flaky: keep the data, retry
                self.send_failures += 1
                if self.send_failures in (1, 10) or self.send_failures % 100 == 0:
                    log.warning("MLflow unreachable (%s); %d items buffered, retrying", exc, self.pending())
                with self._cv:
                    if self._closing and self._close_deadline < time.monotonic():
                        return
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def close(self, timeout: float = 60.0) -> int:
        """Flush for up to `timeout` seconds; return how many items could not be sent."""
        with self._cv:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cv.notify()
        self._thread.join(timeout + 1)
        left = self.pending()
        if left or self.dropped:
            log.warning(
                "MLflow logger closed with %d unsent items and %d dropped metrics", left, self.dropped
            )
        return left + self.dropped


class LabelledInput(torch.nn.Module):
    """A conditional generator as one-input model, the form MLflow's pytorch flavour serves:
    each row is z followed by its class label (a float column, rounded)."""

    def __init__(self, generator: torch.nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x[:, :-1], x[:, -1].round().long())


class Sampler(torch.nn.Module):
    """What `load_generator` returns: `(z)` or `(z, labels)` -> samples, for either kind of
    registered generator (a conditional one without labels draws them from z, as in training).
    A module, so callers move it (`.to(device)`) and switch modes as they would the generator."""

    def __init__(self, module: torch.nn.Module, num_classes: int):
        super().__init__()
        self.module, self.num_classes = module, num_classes

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.num_classes:
            if y is not None:
                raise ValueError("this generator is not conditional: sample it without labels")
            return self.module(z)
        if y is None:
            from trainer.gan.models.blocks import labels_from_latent  # noqa: PLC0415 - conditional only

            y = labels_from_latent(z, self.num_classes)
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(
                f"labels must be in 0..{self.num_classes - 1}, got {y.min().item()}..{y.max().item()}"
            )
        return self.module(torch.cat([z, y.to(z.dtype)[:, None]], dim=1))


def register_generator(
    uri: str,
    run_id: str,
    generator: torch.nn.Module,
    latent_dim: int,
    model_name: str,
    tags: dict[str, Any],
    aliases: tuple[str, ...] = (),
    num_classes: int = 0,
) -> str:
    """Log the EMA generator with signature and input example, register it as a new version
    with `tags` and point each of `aliases` (e.g. candidate) at it; returns the version.

    Saved in MLflow's `pt2` format, chosen explicitly: `torch.export` keeps the graph and
    weights without pickled classes, so loading needs torch and mlflow, not stablegan.
    MLflow 3 reserves the alias `latest`: `models:/NAME@latest` always resolves to the newest
    version without being set.
    """
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    generator = generator.float().eval().cpu()
    example = np.random.default_rng(0).standard_normal((4, latent_dim)).astype(np.float32)
    if num_classes:  # z then the class label: one input, as the pytorch flavour serves it
        generator = LabelledInput(generator)
        labels = (np.arange(4) % num_classes).astype(np.float32)[:, None]
        example = np.concatenate([example, labels], axis=1)
    with torch.no_grad():
        output = generator(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            generator,
            name="generator",
            signature=signature,
            input_example=example,
            registered_model_name=model_name,
            serialization_format="pt2",
            metadata={"latent_dim": latent_dim, "num_classes": num_classes},
            # Skip MLflow's slow requirement inference (it imports the model in a subprocess).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    client = _client(uri)
    version = str(info.registered_model_version)
    # The version's own model_id is not returned by every store: keep the link as a tag.
    tags = {**tags, "logged_model_id": info.model_id}
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, str(v))
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version)
    return version


def resolve_version(uri: str, model_uri: str) -> tuple[str, str]:
    """(name, version) that `models:/NAME/VERSION` or `models:/NAME@ALIAS` names."""
    body = model_uri.removeprefix("models:/")
    if not model_uri.startswith("models:/") or not body:
        raise ValueError(
            f"model={model_uri!r} is not a model URI; use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    client = _client(uri)
    if "@" in body:
        name, alias = body.split("@", 1)
        try:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        except Exception as exc:  # noqa: BLE001 - re-raised with what does exist
            raise LookupError(f"cannot resolve {model_uri}: {describe_registered(uri, name)}") from exc
    name, _, version = body.partition("/")
    try:
        client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - as above
        raise LookupError(f"cannot resolve {model_uri}: {describe_registered(uri, name)}") from exc
    return name, version


def version_run(uri: str, name: str, version: str) -> str:
    """The id of the run that registered `version`."""
    return str(_client(uri).get_model_version(name, version).run_id)


def log_files(uri: str, run_id: str, paths: list[Path], artifact_path: str) -> None:
    client = _client(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def download_file(uri: str, run_id: str, artifact: str, dest: Path) -> Path | None:
    """A run's artifact file downloaded under `dest`; None when the run has no such file."""
    folder, _, name = artifact.rpartition("/")
    if name not in {Path(f.path).name for f in _client(uri).list_artifacts(run_id, folder or None)}:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(_client(uri).download_artifacts(run_id, artifact, str(dest)))


def set_run_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(uri).get_run(run_id).data.tags)


def version_tags(uri: str, name: str, version: str) -> dict[str, str]:
    return dict(_client(uri).get_model_version(name, version).tags)


def alias_version(uri: str, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None."""
    try:
        return str(_client(uri).get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no such alias (or model)
        return None


LOCK_SUFFIX = ".promotion-lock"


@contextlib.contextmanager
def registry_lock(uri: str, name: str, timeout: float = 120.0, stale_after: float = 600.0) -> Iterator[None]:
    """Hold the promotion lock of registered model `name`: a registered model named
    `NAME.promotion-lock`, which the store creates for one caller at a time (a model's name is
    unique in its database, so of two creations at once one fails), released by deleting it.
    A lock older than `stale_after` seconds belongs to a holder that died: it is broken."""
    from mlflow.exceptions import MlflowException

    client, lock = _client(uri), f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                lock, description=f"held by {socket.gethostname()} pid {os.getpid()}"
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            age = time.time() - client.get_registered_model(lock).creation_timestamp / 1000
        except MlflowException:
            continue  # released meanwhile: try again at once
        if age > stale_after:
            log.warning("breaking the promotion lock %s, held for %.0f s", lock, age)
            client.delete_registered_model(lock)
        elif time.monotonic() > deadline:
            raise TimeoutError(f"the promotion lock {lock} has been held for {age:.0f} s; try again later")
        else:
            time.sleep(random.uniform(0.1, 0.4))
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    _client(uri).set_registered_model_alias(name, alias, version)


def set_version_tags(uri: str, name: str, version: str, tags: dict[str, Any]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """A few metrics straight to a run (the driver's end-of-run values)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_evaluation(
    uri: str, name: str, version: str, values: dict[str, float], info: dict[str, str], scores: bool = True
) -> int:
    """Record an evaluation on a version: always as a new record (`eval.record.N`: its values,
    what it was measured with and its comparability key); with `scores`, also as the scores
    promotion compares (`eval.<metric>`, `eval.features`, `eval.key`, ...) and as metrics of
    its logged model (`eval/<metric>`, shown on the version's page). Returns N."""
    client = _client(uri)
    mv = client.get_model_version(name, version)
    n = 1 + sum(1 for k in mv.tags if k.startswith(RECORD_TAG))
    record = {"metrics": values, "info": info, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    client.set_model_version_tag(name, version, f"{RECORD_TAG}{n}", json.dumps(record, sort_keys=True))
    if not scores:
        return n
    stale = [k for k in mv.tags if k.startswith("eval.") and not k.startswith(RECORD_TAG)]
    for k in stale:  # scores of another evaluation must not mix with these
        client.delete_model_version_tag(name, version, k)
    set_version_tags(uri, name, version, {f"eval.{k}": v for k, v in {**values, **info}.items()})
    model_id = mv.model_id or mv.tags.get("logged_model_id")
    step = int(mv.tags.get("steps", 0))
    for k, v in values.items():
        client.log_metric(
            mv.run_id, f"eval/{k}", float(v), step=step, model_id=model_id,
            dataset_name=info.get("features", ""), dataset_digest=info.get("data_sha256", "")[:36],
        )  # fmt: skip
    return n


def describe_registered(uri: str, name: str) -> str:
    """'versions: 1, 2; aliases: latest -> 2' (or why there is nothing) for error messages."""
    client = _client(uri)
    try:
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - any lookup failure means "not there"
        names = [m.name for m in client.search_registered_models(max_results=50)]
        return f"no registered model {name!r}; registered models: {names or 'none'}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
    return f"versions of {name!r}: {versions or 'none'}; aliases: {aliases}"


def load_generator(uri: str, model_uri: str) -> tuple[Sampler, int]:
    """(generator, latent_dim) for `models:/NAME@ALIAS` or `models:/NAME/VERSION`; the generator
    takes z, and labels too when conditional (`Sampler.num_classes` > 0).

    Generators are logged in MLflow's pt2 format (torch.export, no pickled classes), in eval
    mode with a dynamic batch dimension; the latent size comes from the model's signature.
    Errors name the versions and aliases that do exist.
    """
    import mlflow

    resolve_version(uri, model_uri)  # a clear error for a bad URI or a missing version
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = model_uri[len("models:/") :].split("@")[0].split("/")[0]
    try:
        info = mlflow.models.get_model_info(model_uri)
        loaded = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - re-raised with what does exist
        raise LookupError(f"cannot load {model_uri} from {uri}: {describe_registered(uri, name)}") from exc
    num_classes = int((info.metadata or {}).get("num_classes", 0))
    latent_dim = int(info.signature.inputs.inputs[0].shape[-1]) - (1 if num_classes else 0)
    module = (
        loaded.module() if hasattr(loaded, "module") and not isinstance(loaded, torch.nn.Module) else loaded
    )
    return Sampler(module, num_classes), latent_dim
