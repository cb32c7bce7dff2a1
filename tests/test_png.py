"""Our PNGs are standard PNGs, and the fast reader agrees with PIL on them and on PIL's own."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline import png


@pytest.mark.parametrize("shape", [(32, 32), (64, 48, 3), (8, 8, 1)])
def test_our_png_is_read_by_pil_and_fast_path_agrees(shape):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = png.encode(arr)
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # verifies chunk CRCs and the zlib stream
        by_pil = np.asarray(img)
    assert np.array_equal(by_pil, arr.reshape(by_pil.shape))
    fast = png._fast(data)
    assert fast is not None  # our files take the fast path
    expected = arr.reshape(shape[0], shape[1], -1).transpose(2, 0, 1)
    assert np.array_equal(fast, expected) and np.array_equal(png.decode(data), expected)


def test_other_pngs_and_formats_fall_back_to_pil():
    y, x = np.mgrid[0:32, 0:32]
    arr = np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)  # gradients: PIL picks filters
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        if fmt == "PNG":
            assert png._fast(buf.getvalue()) is None  # filtered rows
        out = png.decode(buf.getvalue())
        assert out.shape == (3, 32, 32)
        if fmt == "PNG":
            assert np.array_equal(out, arr.transpose(2, 0, 1))
    rgba = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(rgba, format="PNG")
    assert png.decode(rgba.getvalue()).shape == (3, 4, 4)  # converted to RGB


def test_corrupt_data_raises():
    data = bytearray(png.encode(np.full((16, 16), 7, np.uint8)))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # inside the deflate stream
    with pytest.raises((OSError, ValueError, SyntaxError)):  # what the stream skips and counts
        png.decode(bytes(data))
    with pytest.raises(OSError):
        png.decode(b"not an image")
    with pytest.raises(ValueError, match="need uint8"):
        png.encode(np.zeros((4, 4), np.float32))


def _claiming(width: int, height: int, payload: bytes = b"") -> bytes:
    """A valid-looking PNG whose header claims `width` x `height` gray pixels; its pixel data is
    `payload` deflated (a few bytes: nothing like what the header claims)."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        png.SIGNATURE
        + png._chunk(b"IHDR", header)
        + png._chunk(b"IDAT", zlib.compress(payload, 9))
        + png._chunk(b"IEND", b"")
    )


def test_an_image_over_the_limit_is_refused_before_inflating():
    """A few hundred bytes that claim 100,000 x 100,000 pixels (10 GB as gray): refused from the
    header, by the fast path and by the PIL path alike; PIL's own limit stays on."""
    bomb = _claiming(100_000, 100_000, bytes(1000))
    assert len(bomb) < 200
    with pytest.raises(png.ImageTooLarge, match="100000x100000 pixels is over the limit"):
        png._fast(bomb)
    with pytest.raises(png.ImageTooLarge, match="decompression bomb"):
        png.decode_pil(bomb)  # PIL's own check, from the header too
    with pytest.raises(png.ImageTooLarge, match="5000x5000 pixels is over the limit of 1000000"):
        png.decode_pil(_claiming(5000, 5000, bytes(100)), max_pixels=1000 * 1000)
    with pytest.raises(png.ImageTooLarge):
        png.decode(png.encode(np.zeros((64, 64), np.uint8)), max_pixels=32 * 32)
    assert png.decode(png.encode(np.zeros((64, 64), np.uint8)), max_pixels=64 * 64).shape == (1, 64, 64)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's decompression-bomb check is not switched off


def test_pixel_data_inflates_no_further_than_the_header_says():
    """8x8 claimed, 50 MB of zeros deflated to ~50 KB: the fast path stops at 8 x 9 bytes and
    hands the file on (PIL then reads only what 8x8 needs)."""
    sneaky = _claiming(8, 8, bytes(50_000_000))
    assert len(sneaky) < 100_000
    assert png._fast(sneaky) is None
    assert png.decode(sneaky).shape == (1, 8, 8)
