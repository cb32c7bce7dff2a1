"""PNG the way our shards store it, decodable by any PNG reader, and a fast reader for it.

`make_shards` writes 8-bit grayscale or RGB PNGs whose rows all use filter type 0 (none):
standard PNG files (PIL, browsers, `file`), but decoding them is one `zlib.decompress` and a
reshape, without PIL's per-image open/plugin/filter work, which dominates on 32-64 px images
(benchmarks/RESULTS.md: data pipeline). `decode` takes that path for such files and hands any
other PNG (or JPEG/WebP) to PIL, so shards from other tools still work.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from zlib_ng import zlib_ng  # the same deflate format, inflated faster than the system zlib

from trainer.config.schema import DataConfig

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR = {1: 0, 3: 2}  # channels -> PNG colour type (grayscale, truecolour)
_CHANNELS = {0: 1, 2: 3}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode(arr: np.ndarray, level: int = 6) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes, every row with filter type 0."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"need uint8 (H, W) or (H, W, 1|3), got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    rows = np.zeros((h, w * channels + 1), dtype=np.uint8)  # column 0: the filter byte (0)
    rows[:, 1:] = arr.reshape(h, w * channels)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR[channels], 0, 0, 0)
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


MAX_PIXELS = DataConfig.max_pixels  # the data section's default: far above any GAN's training size


class ImageTooLarge(ValueError):
    """An image claims more pixels than the limit: refused before anything is inflated."""


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image of {width}x{height} pixels is over the limit of {max_pixels} (data.max_pixels): skipped"
        )


def _fast(raw: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """(C, H, W) for an 8-bit, non-interlaced gray/RGB PNG with filter 0 on every row; else None.
    An image over `max_pixels` raises `ImageTooLarge` before any inflating, and the pixel data
    is inflated to at most the size its header gives (so no deflate bomb inflates further)."""
    if not raw.startswith(SIGNATURE):
        return None
    pos, idat, header = 8, [], None
    while pos + 8 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", raw[pos + 8 : pos + 21])
        elif kind == b"IDAT":
            idat.append(raw[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        return None
    w, h, depth, color, _, _, interlace = header
    check_size(w, h, max_pixels)
    if depth != 8 or color not in _CHANNELS or interlace:
        return None
    channels = _CHANNELS[color]
    expected = h * (w * channels + 1)
    inflate = zlib_ng.decompressobj()
    try:  # the stream's adler32 catches corrupt pixel data
        data = inflate.decompress(b"".join(idat), expected + 1)
        if not inflate.eof:
            return None
    except zlib_ng.error:
        return None
    if len(data) != expected:
        return None
    rows = np.frombuffer(data, dtype=np.uint8).reshape(h, w * channels + 1)
    if rows[:, 0].any():
        return None  # some row uses a PNG filter: PIL undoes those
    return rows[:, 1:].reshape(h, w, channels).transpose(2, 0, 1)


def decode(raw: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 (C, H, W) with C = 1 (gray) or 3 (RGB). Raises OSError/ValueError
    on undecodable data (as PIL does), `ImageTooLarge` over `max_pixels`."""
    fast = _fast(raw, max_pixels)
    return fast if fast is not None else decode_pil(raw, max_pixels)


def decode_pil(raw: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`decode` through PIL only: any format PIL reads, gray kept, everything else as RGB. The
    size is checked from the header before decoding; PIL's own decompression-bomb check stays."""
    try:
        img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:  # PIL's own limit, kept on
        raise ImageTooLarge(str(exc)) from None
    with img:
        check_size(*img.size, max_pixels)
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
