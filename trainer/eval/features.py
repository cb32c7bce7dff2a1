"""Feature networks for image metrics, chosen with `eval.features=`.

Every network here takes generated-style images, (N, C, H, W) floats in [-1, 1], and returns
(N, F) features; `name` identifies it (weights included) for the real-data cache and for the
registry, which never compares numbers measured with different networks.

- `digits`: the shipped digits classifier (`trainer/eval/digits.py`), applied to each channel,
  features concatenated (stacked digits: three digits, 3 x 128 features).
- `inception`: the standard FID Inception-v3, as the TorchScript file StyleGAN2-ADA's and
  clean-fid's metrics load (`inception-2015-12-05.pt`). Images are quantized to uint8 as those
  implementations do, grey repeated to RGB; the network resizes to 299x299 itself.
- a TorchScript path (`*.pt`), or `pkg.module:factory` returning an `nn.Module`: a user's
  domain network, called on the [-1, 1] images.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import urllib.request
from pathlib import Path

import torch
from torch import nn

from trainer.eval import digits

INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
INCEPTION_FILE = "inception-2015-12-05.pt"


def cache_root() -> Path:
    """$STABLEGAN_CACHE, else ~/.cache/stablegan."""
    return Path(os.environ.get("STABLEGAN_CACHE") or Path.home() / ".cache" / "stablegan").expanduser()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digest(path: Path) -> str:
    return file_sha256(path)[:12]


class DigitsFeatures(nn.Module):
    """The digits classifier's 128 penultimate features per channel, concatenated."""

    def __init__(self, net: digits.DigitsNet | None = None) -> None:
        super().__init__()
        self.net = net or digits.load()
        self.name = f"digits:{file_digest(digits.WEIGHTS)}" if net is None else "digits:custom"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        f = self.net.features(x.reshape(n * c, 1, *x.shape[2:]))
        return f.reshape(n, c * digits.NUM_FEATURES)

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) predicted digit of every channel."""
        n, c = x.shape[:2]
        return self.net(x.reshape(n * c, 1, *x.shape[2:])).argmax(1).reshape(n, c)


class InceptionFeatures(nn.Module):
    """The FID Inception TorchScript's 2048 pool features, fed as StyleGAN2-ADA feeds it."""

    num_features = 2048

    def __init__(self, path: Path, sha256: str = "") -> None:
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.name = f"inception:{sha256[:12] if sha256 else file_digest(path)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        if img.shape[1] == 1:
            img = img.repeat(1, 3, 1, 1)
        return self.net(img, return_features=True)


class UserFeatures(nn.Module):
    """A user's network (TorchScript file or factory), called on [-1, 1] images."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__()
        self.net, self.name = net, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def inception_file(weights: str, sha256: str = "") -> tuple[Path, str]:
    """The Inception file (`weights` if given, else the cached download, fetched once where a
    network exists) and its sha256, read once: checked (`check_digest`) before TorchScript loads
    the file, then naming the features."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval.inception_weights={weights!r} does not exist")
        digest = file_sha256(path)
        check_digest(path, digest, sha256)
        return path, digest
    path = cache_root() / INCEPTION_FILE
    if not path.is_file():
        return path, download(path, sha256)
    digest = file_sha256(path)
    check_digest(path, digest, sha256 or (record(path).read_text().strip() if record(path).is_file() else ""))
    return path, digest


def download(path: Path, sha256: str) -> str:
    """Fetch the Inception file to `path`, its digest checked against a pin and recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        urllib.request.urlretrieve(INCEPTION_URL, tmp)
    except OSError as exc:
        raise FileNotFoundError(
            f"eval.features=inception needs {INCEPTION_FILE} and it cannot be downloaded here ({exc}). "
            f"Fetch {INCEPTION_URL} on a machine with a network and pass eval.inception_weights=PATH "
            "(or put it in $STABLEGAN_CACHE), or use eval.features=digits for digit data"
        ) from None
    digest = file_sha256(tmp)
    check_digest(tmp, digest, sha256)
    tmp.replace(path)
    record(path).write_text(digest + "\n")
    return digest


def record(path: Path) -> Path:
    """The digest recorded when the cached file was downloaded."""
    return path.with_name(path.name + ".sha256")


def check_digest(path: Path, actual: str, pinned: str) -> None:
    """Refuse a file whose sha256 `actual` is not the `pinned` one (none pinned: any). NVIDIA
    publishes no digest for the Inception file, so the pin is the user's (`eval.inception_sha256`)
    or the one recorded at its download: a file swapped or damaged since then is refused, not
    loaded."""
    if pinned and actual != pinned.lower():
        raise ValueError(
            f"{path} has sha256 {actual}, not the pinned {pinned} (eval.inception_sha256, or the "
            f"digest recorded at download in {record(path).name}): a different or damaged file. "
            f"Fetch {INCEPTION_URL} again, or pin the digest of the file you trust"
        )


def load(spec: str, inception_weights: str = "", inception_sha256: str = "") -> nn.Module:
    """The feature network `spec` names: digits, inception, a TorchScript path or pkg.mod:factory."""
    if spec == "digits":
        return DigitsFeatures()
    if spec == "inception":
        return InceptionFeatures(*inception_file(inception_weights, inception_sha256))
    if spec.endswith((".pt", ".pth", ".ts")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval.features={spec!r}: no such TorchScript file")
        return UserFeatures(
            torch.jit.load(str(path), map_location="cpu").eval(), f"script:{file_digest(path)}"
        )
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ValueError(
            f"eval.features={spec!r} is unknown; use digits, inception, a TorchScript file (.pt) "
            "or pkg.module:factory"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"eval.features={spec!r}: cannot import {attr} from {module_name} ({exc})") from None
    return UserFeatures(factory().eval(), f"module:{spec}")
