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
