"""Animated GIFs and APNGs whose frames PIL composes other than browsers do are
`unchecked_content`: a face a browser shows in a frame could be in none of the frames the
filter checks. Each probe is built so that a browser's frame shows a pattern that no frame
PIL gives holds, and is named by `filter.container_gif` or `filter.container_apng`; the
same animation changed so that PIL composes it as a browser does passes."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from filter.content import FileContent, read_content
from tests.frame_probes import (
    ApngFrame,
    ApngImage,
    GifFrame,
    apng,
    apng_as_browsers_show,
    gif,
    gif_as_browsers_show,
    over_white,
    pattern,
)

N = 48
FACE = pattern(N)
WHITE_FACE_ON_BLACK = np.where(FACE, 255, 0)
BLACK_FACE_ON_WHITE = np.where(FACE, 0, 255)
# GIF: 0-2 black (2 is the transparent index of the frame that draws the face), 3 grey.
PALETTE = [(0, 0, 0), (0, 0, 0), (0, 0, 0), (200, 200, 200)]


def _full(index: int, disposal: int = 0, transparency: int | None = None) -> GifFrame:
    return GifFrame(np.full((N, N), index, np.uint8), disposal=disposal, transparency=transparency)


def _face_through() -> GifFrame:
    """Black, with the face in the transparent index: a browser shows the page through it."""
    return GifFrame(np.where(FACE, 2, 1).astype(np.uint8), transparency=2, disposal=1)


def _composed_as_browsers(content: FileContent, shown: list[np.ndarray], first: int = 0) -> bool:
    """Whether the file's frames, as the filter checks them, are the browser's (over white)."""
    frames = content.views[first : content.frames]
    return len(frames) == len(shown) and all(
        np.abs(view.pixels.astype(int) - over_white(rgba)).max() <= 1
        for view, rgba in zip(frames, shown, strict=True)
    )


def _unchecked(data: bytes, shown: list[np.ndarray], reason: str, first: int = 0) -> None:
    """PIL's frames are not the browser's, and the file is unchecked for that reason."""
    content = read_content(data)
    assert not _composed_as_browsers(content, shown, first)
    assert any(reason in why for why in content.unaccounted), content.unaccounted


def _passes(data: bytes, shown: list[np.ndarray], first: int = 0) -> None:
    content = read_content(data)
    assert content.complete, content.unaccounted
    assert _composed_as_browsers(content, shown, first)


def _gif_unchecked(frames: list[GifFrame], reason: str) -> None:
    shown = gif_as_browsers_show((N, N), PALETTE, frames)
    assert (over_white(shown[-1])[..., 0] == WHITE_FACE_ON_BLACK).all()
    _unchecked(gif((N, N), PALETTE, frames, background=1), shown, reason)


def _gif_passes(frames: list[GifFrame]) -> None:
    _passes(
        gif((N, N), PALETTE, frames, background=1), gif_as_browsers_show((N, N), PALETTE, frames)
    )


def test_gif_disposal_2_without_a_transparent_colour_is_unchecked() -> None:
    # PIL clears frame 1 to the (black) background colour, so frame 2's face is black on
    # black; a browser clears it to transparency and shows the page through the face.
    _gif_unchecked(
        [_full(3, disposal=2), _face_through()],
        "GIF frame 1: disposal 2 without a transparent colour, which browsers clear to "
        "transparency",
    )
    _gif_passes([_full(3, disposal=2, transparency=0), _face_through()])
    # Disposals no frame shows: covered by an opaque frame, or after the last frame.
    _gif_passes([_full(3, disposal=2), _full(1, disposal=1), _face_through()])
    _gif_passes([_full(3, transparency=0), _face_through(), _full(3, disposal=2)])


def test_gif_first_frame_short_of_the_screen_is_unchecked_without_a_transparent_colour() -> None:
    speck = GifFrame(np.full((1, 1), 3, np.uint8), disposal=1)
    _gif_unchecked([speck, _face_through()], "GIF frame 1 does not cover the logical screen")
    _gif_passes([GifFrame(speck.indices, disposal=1, transparency=0), _face_through()])
    # Alone, its margin is one flat colour in PIL (black) and in a browser (the page): the
    # picture is the same, so it is checked as PIL shows it.
    assert read_content(gif((N, N), PALETTE, [speck], background=1)).complete


def test_gif_disposal_3_on_the_first_frame_is_unchecked_without_a_transparent_colour() -> None:
    _gif_unchecked(
        [_full(1, disposal=3), _face_through()],
        "GIF frame 1: disposal 3 on the first frame, without a transparent colour",
    )
    _gif_passes([_full(1, disposal=3, transparency=0), _face_through()])


def test_gif_disposal_0_is_keep_not_the_previous_frames_disposal() -> None:
    # A blank frame 1 with disposal 2, the left half of the face in frame 2 (disposal 0),
    # the right half in frame 3: a browser's frame 3 is the whole face, PIL clears frame 2.
    palette = [(255, 255, 255), (0, 0, 0), (255, 255, 255)]
    half = N // 2
    left = np.where(FACE[:, :half], 1, 2).astype(np.uint8)
    right = GifFrame(np.where(FACE[:, half:], 1, 2).astype(np.uint8), x=half, transparency=2)
    frames = [_full(2, transparency=2, disposal=2), GifFrame(left, transparency=2), right]
    shown = gif_as_browsers_show((N, N), palette, frames)
    assert (over_white(shown[2])[..., 0] == BLACK_FACE_ON_WHITE).all()
    _unchecked(
        gif((N, N), palette, frames),
        shown,
        "GIF frame 2: disposal 0 after disposal 2, which browsers take as keeping the frame",
    )
    for keep in (1, 5):  # 5 to 7 are undefined: browsers keep, PIL restores
        frames[1].disposal = keep
        content = read_content(gif((N, N), palette, frames))
        assert content.complete == (keep == 1), content.unaccounted
        assert _composed_as_browsers(content, shown) == (keep == 1)


def test_gif_disposal_2_after_an_opaque_first_frame_is_unchecked() -> None:
    # Without a transparent colour in frame 1, PIL's canvas has no alpha: it clears frame
    # 2 to its transparent index's colour, opaque.
    frames = [_full(1, disposal=1), _full(3, transparency=2, disposal=2), _face_through()]
    _gif_unchecked(frames, "GIF frame 2: disposal 2 after a first frame without a transparent")
    frames[0].transparency = 0
    _gif_passes(frames)


def test_gif_frame_without_a_colour_table_is_unchecked() -> None:
    frames = [_full(1, disposal=1), GifFrame(np.where(FACE, 1, 0).astype(np.uint8))]
    frames[1].palette = [(255, 255, 255), (0, 0, 0)]
    content = read_content(gif((N, N), None, frames))
    # PIL takes frame 1's indices as grey levels and then ignores frame 2's colour table.
    assert np.ptp(content.views[1].pixels) <= 1
    assert "GIF frame 1 has no colour table" in content.unaccounted[0]
    assert read_content(gif((N, N), PALETTE, frames)).complete


def test_gif_frame_with_two_graphic_control_extensions_is_unchecked() -> None:
    data = gif((N, N), PALETTE, [_full(3, transparency=0), _face_through()])
    control = data.index(b"\x21\xf9\x04")
    twice = data[:control] + data[control : control + 8] + data[control:]
    assert read_content(data).complete
    reasons = read_content(twice).unaccounted
    assert "GIF frame 1 has more than one Graphic Control Extension" in reasons[0]


def _moving_square(mode: str) -> list[Image.Image]:
    frames = []
    for step in range(3):
        frame = Image.new("RGBA", (N, N), (0, 0, 0, 0))
        frame.paste((200, 40 * step, 0, 255), (4 * step, 4 * step, 4 * step + 20, 4 * step + 20))
        frames.append(frame.convert(mode))
    return frames


def _animation(frames: list[Image.Image], image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, image_format, save_all=True, append_images=frames[1:], **options)
    return buffer.getvalue()


def test_pil_written_gifs_pass_unless_a_frame_loses_its_transparent_colour() -> None:
    frames = _moving_square("RGBA")
    for options in ({"disposal": 1}, {"disposal": 2}, {}):
        assert read_content(_animation(frames, "GIF", **options)).complete, options
    data = bytearray(_animation(frames, "GIF", disposal=2, transparency=0))
    assert read_content(bytes(data)).complete
    # The same with its first frame's transparent colour taken out: cleared to black.
    data[data.index(b"\x21\xf9\x04") + 3] &= 0xFE
    assert "GIF frame 1: disposal 2 without a transparent colour" in " ".join(
        read_content(bytes(data)).unaccounted
    )


# APNG --------------------------------------------------------------------------------

_RGB_KEY = (10, 20, 30)
_GREY = 200


def _face_in_transparent_colour(colour: int) -> tuple[ApngImage, str]:
    """Frame 1 grey, disposed with BACKGROUND; frame 2 (blend OVER) black, with the face
    drawn in the transparent colour: a browser shows the page through the face."""
    if colour == 3:
        image = ApngImage((N, N), 3, [], [(0, 0, 0), (_GREY,) * 3, (0, 0, 0)], b"\xff\xff\x00")
        first, second = np.full((N, N), 1), np.where(FACE, 2, 0)
        fill = "opaque palette index 0"
    elif colour == 2:
        image = ApngImage((N, N), 2, [], transparency=struct.pack(">HHH", *_RGB_KEY))
        first, second = np.full((N, N, 3), _GREY), np.zeros((N, N, 3))
        second[FACE] = _RGB_KEY
        fill = "opaque black"
    else:
        image = ApngImage((N, N), 6, [])
        first = np.dstack([np.full((N, N, 3), _GREY), np.full((N, N), 255)])
        second = np.dstack([np.zeros((N, N, 3)), np.where(FACE, 0, 255)])
        fill = ""
    image.frames = [ApngFrame(first, dispose=1), ApngFrame(second, blend=1)]
    return image, fill


@pytest.mark.parametrize("colour", [2, 3])
def test_apng_background_disposal_without_an_alpha_channel_is_unchecked(colour: int) -> None:
    image, fill = _face_in_transparent_colour(colour)
    shown = apng_as_browsers_show(image)
    assert (over_white(shown[1])[..., 0] == WHITE_FACE_ON_BLACK).all()
    _unchecked(
        apng(image),
        shown,
        "APNG frame 1: dispose_op BACKGROUND on an image without an alpha channel, which "
        f"browsers clear to transparent black and PIL to {fill}",
    )


def test_apng_background_disposal_passes_where_pil_clears_to_transparency_too() -> None:
    rgba, _ = _face_in_transparent_colour(6)
    _passes(apng(rgba), apng_as_browsers_show(rgba))
    palette, _ = _face_in_transparent_colour(3)
    palette.palette, palette.transparency = [(0, 0, 0), (_GREY,) * 3, (0, 0, 0)], b"\x00\xff\xff"
    palette.frames[1].samples = np.where(FACE, 0, 2)  # index 0 is the transparent one
    _passes(apng(palette), apng_as_browsers_show(palette))
    # Not shown: the last frame's disposal, or one the next frame draws over, opaque.
    rgb = ApngImage((N, N), 2, [ApngFrame(np.full((N, N, 3), _GREY), dispose=1) for _ in "12"])
    _passes(apng(rgb), apng_as_browsers_show(rgb))
    rgb.frames.append(ApngFrame(np.zeros((N // 2, N // 2, 3))))
    _unchecked(apng(rgb), apng_as_browsers_show(rgb), "APNG frame 2: dispose_op BACKGROUND")


def _rgba(grey: np.ndarray, alpha: np.ndarray | int = 255) -> np.ndarray:
    return np.dstack([grey, grey, grey, np.broadcast_to(alpha, grey.shape)]).astype(np.uint8)


def test_apng_previous_disposal_after_blend_over_is_unchecked() -> None:
    # Frame 1: the face's left half; frame 2 covers it with a grey panel (PREVIOUS, OVER);
    # frame 3 adds the right half. A browser's frame 3 is the whole face; PIL never
    # reverts frame 2.
    half = N // 2
    first = _rgba(np.where(FACE, 0, 255))
    first[:, half:] = 255
    last = np.zeros((N, N, 4), np.uint8)
    last[:, half:] = _rgba(np.where(FACE, 0, 255))[:, half:]
    panel = ApngFrame(_rgba(np.full((N, half), 128)), dispose=2, blend=1)
    image = ApngImage((N, N), 6, [ApngFrame(first), panel, ApngFrame(last, blend=1)])
    shown = apng_as_browsers_show(image)
    assert (over_white(shown[2])[..., 0] == BLACK_FACE_ON_WHITE).all()
    _unchecked(
        apng(image), shown, "APNG frame 2: dispose_op PREVIOUS after blend OVER, which browsers"
    )
    panel.blend = 0  # blend SOURCE: PIL keeps what PREVIOUS restores
    _passes(apng(image), apng_as_browsers_show(image))


def test_apng_blend_over_on_grey_with_a_transparent_level_is_unchecked() -> None:
    # Frame 2 holds the face's right half, its left half in the transparent level: a
    # browser shows frame 1's left half through it, PIL pastes the frame opaque.
    half, key = N // 2, 7
    first = np.where(FACE, 0, 255)
    first[:, half:] = 255
    second = np.where(FACE, 0, 255)
    second[:, :half] = key
    grey = ApngImage(
        (N, N),
        0,
        [ApngFrame(first), ApngFrame(second, blend=1)],
        transparency=struct.pack(">H", key),
    )
    shown = apng_as_browsers_show(grey)
    assert (over_white(shown[1])[..., 0] == BLACK_FACE_ON_WHITE).all()
    _unchecked(
        apng(grey), shown, "APNG frame 2: blend OVER on a greyscale image with a transparent"
    )
    rgb = ApngImage(
        (N, N),
        2,
        [ApngFrame(np.dstack([f.samples] * 3)) for f in grey.frames],
        transparency=struct.pack(">HHH", key, key, key),
    )
    rgb.frames[1].blend = 1
    _passes(apng(rgb), apng_as_browsers_show(rgb))


def test_apng_blend_over_with_partly_transparent_palette_colours_is_unchecked() -> None:
    # Frame 2 veils frame 1's face with a half-transparent grey: a browser shows the face
    # through it, PIL blends palette indices and shows the veil alone.
    palette = [(0, 0, 0), (255, 255, 255), (128, 128, 128)]
    frames = [ApngFrame(np.where(FACE, 0, 1)), ApngFrame(np.full((N, N), 2), blend=1)]
    veiled = ApngImage((N, N), 3, frames, palette, b"\xff\xff\x80")
    shown = apng_as_browsers_show(veiled)
    assert np.ptp(over_white(shown[1])) > 100
    _unchecked(apng(veiled), shown, "APNG frame 2: blend OVER with partly transparent palette")
    veiled.transparency = b"\xff\xff\x00"  # fully transparent or opaque: PIL blends right
    _passes(apng(veiled), apng_as_browsers_show(veiled))


def test_apng_first_frame_over_a_default_image_that_is_not_a_frame_is_unchecked() -> None:
    # PIL composes frame 1 over the default image (black), a browser over transparency.
    face = ApngFrame(_rgba(np.zeros((N, N)), np.where(FACE, 0, 255)), blend=1)
    image = ApngImage((N, N), 6, [face], default=_rgba(np.zeros((N, N))))
    shown = apng_as_browsers_show(image)
    assert (over_white(shown[0])[..., 0] == WHITE_FACE_ON_BLACK).all()
    _unchecked(apng(image), shown, "APNG frame 1 follows a default image", first=1)
    face.blend = 0  # blend SOURCE over the whole image: the default image is replaced
    _passes(apng(image), apng_as_browsers_show(image), first=1)


def test_pil_written_apngs_pass_unless_an_opaque_image_is_cleared() -> None:
    for mode, options in (
        ("RGBA", {}),
        ("RGBA", {"disposal": 1}),
        ("RGB", {}),
        ("RGB", {"blend": 1}),
    ):
        data = _animation(_moving_square(mode), "PNG", **options)
        assert read_content(data).complete, (mode, options)
    # PREVIOUS on the first frame is BACKGROUND: PIL clears an RGB image to opaque black.
    data = _animation(_moving_square("RGB"), "PNG", disposal=2)
    assert "APNG frame 1: dispose_op BACKGROUND" in " ".join(read_content(data).unaccounted)
