"""Pictures the worker and the driver log: image grids, 2-D scatters, the stability report."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from trainer.train.probe import WATCH


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (N,C,H,W) in [-1,1] -> uint8 (N,H,W,C)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return x.transpose(0, 2, 3, 1)


def grid_array(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """Images (N,C,H,W) in [-1,1] -> one uint8 grid (H',W',C), `nrow` images a row."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 2
    canvas = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = x[i]
    return canvas


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 (H,W,C) with C 1 or 3 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: torch.Tensor, nrow: int | None = None) -> bytes:
    """Images (N,C,H,W) in [-1,1] -> one PNG grid (PIL only; torchvision is not a dependency)."""
    return png_bytes(grid_array(images, nrow))


def scatter_png(points: np.ndarray, modes: np.ndarray | None = None, title: str = "") -> bytes:
    """2-D samples as a scatter plot (with the true modes as crosses when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, color="tab:blue", label="samples")
    if modes is not None:
        ax.scatter(modes[:, 0], modes[:, 1], s=40, marker="x", color="tab:red", label="modes")
    lim = max(1.5, float(np.abs(modes).max()) * 1.3) if modes is not None else None
    if lim:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def report_png(history: dict[str, list[tuple[int, float]]], summary: dict, title: str = "") -> bytes:
    """A grid of the watched signals over steps, with the divergence step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in WATCH if history.get(k)] + [
        k for k in ("penalty", "d_acc_real", "d_acc_fake", "reverse_kl") if history.get(k)
    ]
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = zip(*history[key])
        ax.plot(steps, values, lw=1.2)
        ax.set_title(key + ("  (moved first)" if key == summary.get("first_signal") else ""), fontsize=9)
        if summary.get("diverged_at") is not None:
            ax.axvline(summary["diverged_at"], color="red", ls="--", lw=1)
        if key in summary.get("first_moves", {}):
            ax.axvline(summary["first_moves"][key], color="orange", ls=":", lw=1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    verdict = f"diverged at step {summary['diverged_at']}" if summary["diverged"] else "stable"
    fig.suptitle(f"{title}  {verdict}; first signal: {summary.get('first_signal') or 'none'}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def sweep_png(rows: list[dict], keys: list[str], log_keys: set[str], metric: str, title: str = "") -> bytes:
    """A sweep's robustness picture: `metric` against each searched key, one panel per key;
    completed trials as dots, stopped-early ones grey, diverged or failed ones red crosses
    along the top (their metric is not a score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), dpi=100, squeeze=False)
    scored = [r[metric] for r in rows if r["ended"] != "diverged" and math.isfinite(r.get(metric, math.nan))]
    top = max(scored) * 1.2 if scored else 1.0
    style = {
        "completed": {"color": "tab:blue", "marker": "o"},
        "stopped early": {"color": "0.6", "marker": "o"},
        "diverged": {"color": "tab:red", "marker": "x"},
        "failed": {"color": "tab:red", "marker": "x"},
    }
    for ax, key in zip(axes[0], keys, strict=True):
        for ended, st in style.items():
            picked = [r for r in rows if r["ended"] == ended]
            ys = [r[metric] if ended in ("completed", "stopped early") else top for r in picked]
            ax.scatter([r[key] for r in picked], ys, s=30, label=f"{ended} ({len(picked)})", **st)
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} at the trial's last step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
