"""S3 (and S3-compatible) object storage: shards streamed from `s3://`, checkpoints through
Ray Train's storage, the run's files uploaded beside them.

Credentials and the endpoint come from the environment only, the way boto3 and pyarrow read
them: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL`
for a server other than AWS (MinIO, Ceph, a local moto server). MLflow's own S3 artifact store
reads `MLFLOW_S3_ENDPOINT_URL` instead; `endpoint_env()` fills it in from `AWS_ENDPOINT_URL`.

Importing this module registers `s3://` with webdataset's `gopen`, so every shard reader,
including DataLoader worker processes, can open such URLs: the object's body is read as it
arrives, never copied to local disk first.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from webdataset.gopen import gopen_schemes

S3 = "s3://"


def is_s3(url: Any) -> bool:
    return isinstance(url, str) and url.startswith(S3)


def split(url: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r} is not an s3://BUCKET/KEY URL")
    return parsed.netloc, parsed.path.lstrip("/")


def endpoint_env() -> dict[str, str]:
    """Environment for a child process (or this one) so that MLflow's S3 artifact store talks
    to the same endpoint boto3 and pyarrow use."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"MLFLOW_S3_ENDPOINT_URL": url} if url and "MLFLOW_S3_ENDPOINT_URL" not in os.environ else {}


@lru_cache(maxsize=1)
def client() -> Any:
    """A boto3 S3 client from the environment (one per process: DataLoader workers fork)."""
    try:
        import boto3
    except ImportError:
        raise ImportError(
            "s3:// URLs need boto3: pip install 'stablegan[server]' (or pip install boto3)"
        ) from None
    return boto3.client("s3")


class _Body:
    """A streaming object body with the file methods webdataset's readers use."""

    def __init__(self, body: Any):
        self.body = body

    def read(self, n: int = -1) -> bytes:
        return self.body.read() if n is None or n < 0 else self.body.read(n)

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> _Body:
    """webdataset `gopen` handler: the object's body as a stream (read as it arrives)."""
    if mode[0] != "r":
        raise ValueError(f"{url}: s3:// shards are read-only (mode {mode!r})")
    bucket, key = split(url)
    return _Body(client().get_object(Bucket=bucket, Key=key)["Body"])


gopen_schemes["s3"] = gopen_s3


def read_bytes(url: str) -> bytes:
    bucket, key = split(url)
    return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def list_keys(url: str, suffix: str = "") -> list[str]:
    """Every object URL under the prefix `url` ending in `suffix`, sorted."""
    bucket, prefix = split(url)
    pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return sorted(f"{S3}{bucket}/{k}" for k in keys if k.endswith(suffix))


def upload_folder(folder: Path, url: str) -> None:
    """Copy every file under `folder` to the prefix `url` (the run's outputs beside its
    checkpoints)."""
    bucket, prefix = split(url.rstrip("/") + "/")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client().upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())


def pyarrow_fs() -> Any:
    """The pyarrow filesystem Ray Train stores checkpoints through, on the environment's endpoint."""
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs = {"endpoint_override": parsed.netloc or endpoint, "scheme": parsed.scheme or "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pyarrow.fs.S3FileSystem(**kwargs)
