"""Resolving a shard spec (brace pattern, list, folder or manifest) into a checked list of URLs."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

from data_pipeline import objstore

MANIFEST = "manifest.json"


class ShardSpecError(ValueError):
    """The shard spec names nothing readable, or names it wrongly."""


@dataclass
class ShardList:
    """Shard URLs in a stable order, plus the manifest that describes them when there is one."""

    urls: list[str]
    manifest: dict | None = None
    sha256: dict[str, str] = field(default_factory=dict)  # url -> expected digest
    sizes: dict[str, int] = field(default_factory=dict)  # url -> expected byte size

    @property
    def kind(self) -> str | None:
        return self.manifest.get("kind") if self.manifest else None

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        shape = self.manifest.get("sample_shape") if self.manifest else None
        return tuple(shape) if shape else None


def local_path(url: str) -> Path | None:
    """The filesystem path behind a plain path or file:// URL; None for pipe: and remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and url[1:3] == ":\\"):
        return Path(url).expanduser()
    return None


def absolute(spec: Any) -> Any:
    """A shard spec (str or list) with its relative local paths made absolute against this
    process's folder: the processes that read the shards (Ray workers) run in other folders."""
    if isinstance(spec, (list, tuple)):
        return [absolute(item) for item in spec]
    if not isinstance(spec, str) or not spec.strip() or local_path(spec) is None or spec.startswith("file:"):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def _expand(pattern: str) -> list[str]:
    try:
        return list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise ShardSpecError(
            f"malformed brace pattern {pattern!r}: braces do not balance "
            "(write e.g. 'shards/faces-{000000..000127}.tar')"
        ) from None


def _from_manifest(path: Path | str) -> ShardList:
    """The shards a manifest lists, as URLs beside it (a local path or an s3:// object)."""
    try:
        text = objstore.read_bytes(path) if objstore.is_s3(path) else Path(path).read_text()
        manifest = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - OSError, bad JSON, boto3's (missing object, credentials)
        raise ShardSpecError(f"cannot read manifest {path}: {exc}") from None
    if not manifest.get("shards"):
        raise ShardSpecError(f"manifest {path} lists no shards; rebuild it with data_pipeline.make_shards")
    if objstore.is_s3(path):
        urls = [str(path).rsplit("/", 1)[0] + "/" + s["name"] for s in manifest["shards"]]
    else:
        urls = [str(Path(path).parent / s["name"]) for s in manifest["shards"]]
    return ShardList(
        urls,
        manifest,
        {u: s["sha256"] for u, s in zip(urls, manifest["shards"]) if "sha256" in s},
        {u: s["bytes"] for u, s in zip(urls, manifest["shards"]) if "bytes" in s},
    )


def _from_s3(spec: str) -> ShardList:
    """s3://BUCKET/PREFIX/manifest.json, or a prefix holding one (else its .tar objects)."""
    if spec.endswith(".json"):
        return _from_manifest(spec)
    if spec.endswith(".tar"):
        return ShardList([spec])
    prefix = spec.rstrip("/") + "/"
    try:
        objects = objstore.list_keys(prefix)
    except Exception as exc:  # noqa: BLE001 - boto3's errors: no bucket, credentials, endpoint
        raise ShardSpecError(f"cannot list {prefix}: {exc}") from None
    if prefix + MANIFEST in objects:
        return _from_manifest(prefix + MANIFEST)
    tars = [u for u in objects if u.endswith(".tar")]
    if not tars:
        raise ShardSpecError(f"{prefix} holds no .tar shards and no {MANIFEST}")
    return ShardList(tars)


def resolve(spec: str | list[str] | tuple[str, ...]) -> ShardList:
    """Turn a shard spec into URLs; a folder or manifest brings its manifest along.

    Raises `ShardSpecError` naming the problem for an empty spec, a malformed brace pattern,
    missing local files or a folder with no shards.
    """
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1:
            return resolve(spec[0])
        urls = [u for item in spec for u in _expand(str(item))]
        result = ShardList(urls)
    else:
        spec = str(spec).strip()
        if not spec:
            raise ShardSpecError(
                "no shards given: set data.urls to a brace pattern, list, folder or manifest"
            )
        path = local_path(spec) if "{" not in spec else None
        if objstore.is_s3(spec) and "{" not in spec:
            result = _from_s3(spec)
        elif path is not None and path.is_dir():
            if (path / MANIFEST).is_file():
                result = _from_manifest(path / MANIFEST)
            else:
                result = ShardList(sorted(str(p) for p in path.glob("*.tar")))
                if not result.urls:
                    raise ShardSpecError(f"folder {path} holds no .tar shards and no {MANIFEST}")
        elif path is not None and path.suffix == ".json":
            if not path.is_file():
                raise ShardSpecError(f"manifest {spec} does not exist")
            result = _from_manifest(path)
        else:
            result = ShardList(_expand(spec))
            sibling = local_path(result.urls[0]) if result.urls else None
            # A pattern inside a folder with a manifest still gets the manifest's checks.
            if sibling is not None and (sibling.parent / MANIFEST).is_file():
                full = _from_manifest(sibling.parent / MANIFEST)
                by_name = {Path(u).name: u for u in full.urls}
                result.manifest = full.manifest
                for url in result.urls:
                    ref = by_name.get(Path(local_path(url) or url).name)
                    if ref in full.sha256:
                        result.sha256[url] = full.sha256[ref]
                    if ref in full.sizes:
                        result.sizes[url] = full.sizes[ref]
    missing = [u for u in result.urls if (p := local_path(u)) is not None and not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ShardSpecError(f"{len(missing)} shard(s) not found: {', '.join(missing[:3])}{more}")
    if not result.urls:
        raise ShardSpecError(f"shard spec {spec!r} names no shards")
    return result


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(shards: ShardList, full: bool = True) -> None:
    """Check local shards against the manifest: byte sizes always, sha256 when `full`."""
    for url in shards.urls:
        path = local_path(url)
        if path is None:
            continue
        if url in shards.sizes and path.stat().st_size != shards.sizes[url]:
            raise ShardSpecError(
                f"shard {url} is {path.stat().st_size} bytes but the manifest says {shards.sizes[url]}: "
                "the file is truncated or was replaced; rebuild the shards"
            )
        if full and url in shards.sha256 and sha256_file(path) != shards.sha256[url]:
            raise ShardSpecError(
                f"shard {url} does not match the sha256 in its manifest: the file is corrupt or "
                "was replaced; rebuild the shards (or set data.verify=false to skip the check)"
            )
