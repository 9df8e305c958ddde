import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filter.errors import ImageError
from filter.images import ImageLimits, decode_image


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(img, "JPEG", exif=exif, quality=95))
    assert decoded.shape == (40, 20, 3)
    # After a clockwise turn the left stripe is at the top.
    assert decoded[2, 10, 2] > 200 and decoded[-3, 10, 0] > 200


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "RGBA", "LA", "1"])
def test_every_mode_becomes_rgb_uint8(mode: str) -> None:
    base = Image.linear_gradient("L").resize((32, 24))
    img = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype(np.uint16))
    )
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    decoded = decode_image(_encode(img, fmt))
    assert decoded.dtype == np.uint8 and decoded.shape == (24, 32, 3)


def test_transparent_pixels_composite_on_white() -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (decode_image(_encode(img)) == 255).all()


def test_corrupt_truncated_and_empty_inputs_raise_clear_errors(tmp_path: Path) -> None:
    good = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(b"definitely not an image")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="cannot read file"):
        decode_image(tmp_path / "missing.jpg")


def test_size_limits_stop_bombs_before_decoding() -> None:
    big = _encode(Image.new("RGB", (300, 300)))
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(big, ImageLimits(max_pixels=300 * 299))
    with pytest.raises(ImageError, match="bytes, over the limit"):
        decode_image(big, ImageLimits(max_bytes=len(big) - 1))
