"""The `digits` feature network: a small CNN trained on scikit-learn's bundled digits.

Its penultimate layer (128 features) gives a domain Fréchet distance (FD-digits); its labels
count modes (stacked digits). The weights ship with the project (`digits_classifier.pt`, made by
`python -m trainer.eval.digits`, seconds on a CPU); every fifth digit is held out and the
held-out accuracy is stored beside the weights and checked by the tests (>= 97 %).

Input: (N, 1, H, W) images in [-1, 1], bright strokes on black, like the shards that
`make_shards source=digits` writes; other sizes are resized to 32x32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS = Path(__file__).with_name("digits_classifier.pt")
RESOLUTION = 32
NUM_FEATURES = 128


class DigitsNet(nn.Module):
    """Three conv blocks, a 128-unit hidden layer (the features), a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, NUM_FEATURES), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(NUM_FEATURES, 10)
        # Makes the features' mean 1 on the training digits, so that KID's cubic kernel
        # (x.y / dim + 1)^3 works at the scale it was designed for (Inception's pool features).
        self.register_buffer("scale", torch.ones(()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        return self.body(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [-1, 1] -> (N, 128) penultimate activations, scaled."""
        return self.embed(x) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def load(path: Path = WEIGHTS) -> DigitsNet:
    """The shipped classifier, in eval mode."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; make it with: python -m trainer.eval.digits (seconds on a CPU)"
        )
    state = torch.load(path, weights_only=True)
    net = DigitsNet()
    net.load_state_dict(state["model"])
    net.heldout_accuracy = float(state["heldout_accuracy"])
    return net.eval()


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits at 32x32 in [-1, 1], made exactly as `make_shards source=digits` makes them."""
    from data_pipeline.sources import digits_source

    src = digits_source(RESOLUTION, 1)
    x = np.stack([src.load(i) for i in range(len(src))])
    return torch.from_numpy(x).float().div(127.5).sub(1).unsqueeze(1), torch.from_numpy(src.labels)


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: every fifth sample is held out."""
    idx = np.arange(n)
    return idx[idx % 5 != 0], idx[idx % 5 == 0]


def _shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations of up to `pixels` (the same per batch, to stay cheap)."""
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(epochs: int = 30, seed: int = 0) -> tuple[DigitsNet, float]:
    """Train on the four fifths, return the net and its held-out accuracy."""
    torch.manual_seed(seed)
    x, y = dataset()
    tr, te = split(len(x))
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(tr), generator=gen).split(64):
            i = torch.from_numpy(tr)[batch]
            loss = F.cross_entropy(net(_shift(x[i], gen)), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        net.scale.fill_(1.0 / float(net.embed(x[tr]).mean()))
        acc = float((net(x[te]).argmax(1) == y[te]).float().mean())
    return net, acc


def main(argv: list[str] | None = None) -> int:
    """Train and write `digits_classifier.pt` (or the path given as out=PATH)."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), WEIGHTS))
    net, acc = train()
    torch.save({"model": net.state_dict(), "heldout_accuracy": acc}, out)
    print(f"digits classifier: held-out accuracy {acc:.4f} on {len(split(1797)[1])} digits; wrote {out}")
    return 0 if acc >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
