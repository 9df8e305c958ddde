"""GIF: its blocks, what they hold, and where PIL composes its frames other than browsers.

Image blocks and the Graphic Control Extensions that precede them are read; comment,
plain-text, NETSCAPE/ANIMEXTS, XMP and ICC application blocks are scanned for embedded
images. Unaccounted: other extensions, bytes after the trailer, and frames PIL composes
other than browsers do (`_gif_composition`), where a later frame can show the difference
(tests/unit/test_frame_composition.py).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from filter.content_scan import Layout, scan

_GIF_APPLICATIONS = {b"NETSCAPE2.0", b"ANIMEXTS1.0", b"XMP DataXMP", b"ICCRGBG1012"}


@dataclass(frozen=True)
class _GifFrame:
    """How a GIF frame is composed: its Graphic Control Extension and image descriptor."""

    box: tuple[int, int, int, int]  # left, top, right, bottom on the logical screen
    disposal: int  # as written: 0 without a Graphic Control Extension
    transparent: bool  # it has a transparent colour index


def walk_gif(data: bytes, layout: Layout) -> None:
    if len(data) < 13:
        layout.unread("the GIF header is truncated")
        return
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames: list[_GifFrame] = []
    control: tuple[int, bool] | None = None  # the next frame's disposal and transparency
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:
            _gif_composition(frames, struct.unpack_from("<HH", data, 6), layout)
            layout.end = pos + 1
            return
        if block == 0x2C:  # an image: descriptor, local colour table, LZW data
            if pos + 10 > len(data):
                break
            x, y, width, height, local = struct.unpack_from("<HHHHB", data, pos + 1)
            if not (flags | local) & 0x80:
                layout.unread(
                    f"GIF frame {len(frames) + 1} has no colour table, which viewers compose "
                    "differently (PIL shows its indices as grey levels)"
                )
            disposal, transparent = control or (0, False)
            frames.append(_GifFrame((x, y, x + width, y + height), disposal, transparent))
            control = None
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
            pos, _ = _sub_blocks(data, pos)
        elif block == 0x21 and pos + 1 < len(data):
            label = data[pos + 1]
            first = data[pos + 3 : pos + 3 + data[pos + 2]] if pos + 2 < len(data) else b""
            pos, payload = _sub_blocks(data, pos + 2)
            if label == 0xF9:
                control = _gif_control(first, control, len(frames) + 1, layout)
                continue
            if label in (0xFE, 0x01):
                scan(payload, "a GIF comment" if label == 0xFE else "a GIF text block", layout)
            elif label == 0xFF and payload[:11] in _GIF_APPLICATIONS:
                scan(payload[11:], f"the GIF {payload[:8].decode('latin-1')} block", layout)
            else:
                layout.unread(f"a GIF extension {label:#04x} that facegate does not read")
        else:
            layout.unread(f"an unknown GIF block {block:#04x} at byte {pos}")
            return
    layout.unread("the GIF ends without its trailer")


def _gif_control(
    block: bytes, control: tuple[int, bool] | None, number: int, layout: Layout
) -> tuple[int, bool]:
    """A Graphic Control Extension's disposal method and transparency flag (its first
    sub-block, as decoders read it)."""
    if len(block) < 4:
        layout.unread(f"GIF frame {number}'s Graphic Control Extension holds under 4 bytes")
    elif control is not None:
        # PIL keeps a transparency flag and a non-zero disposal from any of them;
        # browsers take the last one's.
        layout.unread(
            f"GIF frame {number} has more than one Graphic Control Extension, which viewers "
            "apply differently"
        )
    return (block[0] >> 2 & 7, bool(block[0] & 1)) if block else (0, False)


# How a frame is disposed of before the next one is drawn.
_KEEP, _CLEAR, _RESTORE = "keep", "clear", "restore"


def _browser_disposal(written: int) -> str:
    """Chromium (Skia) and Firefox: 2 clears to transparency, 3 and 4 restore the canvas
    as it was before the frame, 0, 1 and the undefined 5 to 7 keep the frame."""
    return _CLEAR if written == 2 else _RESTORE if written in (3, 4) else _KEEP


def _pil_disposal(carried: int) -> str:
    """GifImagePlugin: the last non-zero disposal method written so far (a frame that
    writes 0, or has no Graphic Control Extension, carries the previous one on); 2 clears,
    3 and above restore."""
    return _KEEP if carried < 2 else _CLEAR if carried == 2 else _RESTORE


def _gif_composition(frames: list[_GifFrame], screen: tuple[int, int], layout: Layout) -> None:
    """Unread where PIL composes the frames other than browsers do. Browsers start from a
    transparent canvas and clear to transparency; PIL's canvas is opaque unless the first
    frame has a transparent colour, and it clears to transparency only with the disposed
    frame's transparent colour. A disposal matters only if a later frame can show it."""
    if not frames:
        return
    first = frames[0]
    # Browsers and PIL widen the logical screen to the first frame.
    width, height = max(screen[0], first.box[2]), max(screen[1], first.box[3])
    # Alone, the margin is one flat colour either way; a later frame can show through it.
    if len(frames) > 1 and not first.transparent and first.box != (0, 0, width, height):
        layout.unread(
            "GIF frame 1 does not cover the logical screen and has no transparent colour: "
            "browsers show transparency around it, PIL palette index 0"
        )
    carried = 0
    for number, (frame, after) in enumerate(itertools.pairwise(frames), 1):
        carried = frame.disposal or carried
        why = _gif_difference(number, frame, carried, first.transparent)
        if why is None:
            continue
        # The next frame hides the disposal if it draws over all of it, opaque, and is
        # the last frame or not itself restored to what lies under it.
        restored = _RESTORE in (
            _browser_disposal(after.disposal),
            _pil_disposal(after.disposal or carried),
        )
        hidden = (
            not after.transparent
            and _inside(_clipped(frame.box, width, height), _clipped(after.box, width, height))
            and (number + 1 == len(frames) or not restored)
        )
        if not hidden:
            layout.unread(f"GIF frame {number}: {why}")


def _gif_difference(number: int, frame: _GifFrame, carried: int, canvas_alpha: bool) -> str | None:
    """How PIL disposes of this frame other than browsers, if it does."""
    pil, browser = _pil_disposal(carried), _browser_disposal(frame.disposal)
    if number == 1:  # what was under the first frame: transparency, which PIL has only
        browser = _CLEAR if browser == _RESTORE else browser  # with a transparent colour
        pil = (_CLEAR if frame.transparent else _KEEP) if pil == _RESTORE else pil
    if pil != browser:
        if number == 1 and browser == _CLEAR and frame.disposal != 2:
            return (
                f"disposal {frame.disposal} on the first frame, without a transparent colour, "
                "which browsers clear to transparency and PIL leaves drawn"
            )
        if frame.disposal == 0:
            return (
                f"disposal 0 after disposal {carried}, which browsers take as keeping the "
                f"frame and PIL as disposal {carried}"
            )
        return (
            f"disposal {frame.disposal}, undefined, which browsers take as keeping the frame "
            "and PIL as restoring what was under it"
        )
    if pil == _CLEAR and not frame.transparent:
        return (
            "disposal 2 without a transparent colour, which browsers clear to transparency "
            "and PIL to the background colour"
        )
    if pil == _CLEAR and not canvas_alpha:
        return (
            "disposal 2 after a first frame without a transparent colour, which browsers "
            "clear to transparency and PIL to an opaque colour"
        )
    return None


def _clipped(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    return box[0], box[1], min(box[2], width), min(box[3], height)


def _inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    if inner[0] >= inner[2] or inner[1] >= inner[3]:
        return True  # nothing of it is shown
    return (
        outer[0] <= inner[0]
        and outer[1] <= inner[1]
        and inner[2] <= outer[2]
        and inner[3] <= outer[3]
    )


def _sub_blocks(data: bytes, pos: int) -> tuple[int, bytes]:
    out = bytearray()
    while pos < len(data):
        size = data[pos]
        if size == 0:
            return pos + 1, bytes(out)
        out.extend(data[pos + 1 : pos + 1 + size])
        pos += 1 + size
    return pos, bytes(out)
