"""APNG frame composition for the content rule (`filter.container_png` walks the chunks).

The APNG specification and browsers compose frames on a canvas that starts transparent:
dispose_op BACKGROUND clears a frame's region to transparent black, PREVIOUS restores it
as it was before the frame, blend OVER composites with alpha. PIL's PngImagePlugin gives
other frames where:

- BACKGROUND (or PREVIOUS on the first frame) on an image without an alpha channel fills
  opaque black or palette index 0, unless that is the transparent colour (tRNS);
- PREVIOUS after a blend-OVER frame restores nothing (its OVER blend draws into the copy
  kept for PREVIOUS);
- blend OVER on a greyscale image with a transparent level pastes the frame opaque;
- blend OVER with partly transparent palette colours blends palette indices, not colours;
- a default image that is not a frame (IDAT before the first fcTL) is the canvas the first
  frame is composed on, and what PREVIOUS on that frame restores.

Each is unread where a later frame can show it: a disposal that the next frame draws over
entirely, opaque, is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from filter.content_scan import Layout

NONE, BACKGROUND, PREVIOUS = 0, 1, 2  # dispose_op
SOURCE, OVER = 0, 1  # blend_op


@dataclass(frozen=True)
class Control:
    """An fcTL chunk: the frame's rectangle and how it is composed."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    dispose: int
    blend: int
    after_idat: bool  # the default image came before it: it is not a frame


@dataclass(frozen=True)
class Colours:
    """What IHDR and tRNS say about the image's transparency."""

    colour: int  # IHDR colour type
    depth: int
    transparency: bytes | None  # the tRNS chunk's body


def check_composition(
    controls: list[Control], size: tuple[int, int], colours: Colours, layout: Layout
) -> None:
    """Unread each frame that PIL composes other than the APNG specification."""
    if not controls:
        return
    see_through = _may_be_transparent(colours)
    separate = controls[0].after_idat  # PIL composes frame 1 on the default image
    if separate and not _replaces(controls[0], (0, 0, *size), see_through):
        layout.unread(
            "APNG frame 1 follows a default image that is not a frame, which browsers "
            "compose it over transparency and PIL over the default image"
        )
    for number, frame in enumerate(controls, 1):
        if frame.blend == OVER and (number > 1 or separate):
            _over(number, colours, layout)
        if number == len(controls):
            break  # its disposal shows in no frame
        why = _disposal_difference(number, frame, colours, separate)
        after = controls[number]
        # Unless the next frame is the last, it hides the disposal only if it is not
        # itself restored to what lay under it.
        restored = after.dispose == PREVIOUS and number + 1 < len(controls)
        if why and (restored or not _replaces(after, frame.box, see_through)):
            layout.unread(f"APNG frame {number}: {why}")


def _over(number: int, colours: Colours, layout: Layout) -> None:
    transparency = colours.transparency
    if transparency is None:
        return
    if colours.colour == 0:
        layout.unread(
            f"APNG frame {number}: blend OVER on a greyscale image with a transparent "
            "level, which browsers show the previous frame through and PIL does not"
        )
    elif colours.colour == 3 and any(0 < alpha < 255 for alpha in transparency):
        layout.unread(
            f"APNG frame {number}: blend OVER with partly transparent palette colours, "
            "which browsers blend as colours and PIL as palette indices"
        )


def _disposal_difference(
    number: int, frame: Control, colours: Colours, separate: bool
) -> str | None:
    dispose = frame.dispose
    if number == 1 and dispose == PREVIOUS:
        if separate:
            return (
                "dispose_op PREVIOUS on the first frame, which browsers clear to "
                "transparent black and PIL restores to the default image"
            )
        dispose = BACKGROUND  # the specification's rule, and PIL's
    if dispose == BACKGROUND and not _zero_is_transparent(colours):
        fill = "palette index 0" if colours.colour == 3 else "black"
        return (
            "dispose_op BACKGROUND on an image without an alpha channel, which browsers "
            f"clear to transparent black and PIL to opaque {fill}"
        )
    if dispose == PREVIOUS and frame.blend == OVER:
        return "dispose_op PREVIOUS after blend OVER, which browsers revert and PIL does not"
    return None


def _replaces(frame: Control, box: tuple[int, int, int, int], see_through: bool) -> bool:
    """Whether `frame` replaces every pixel of `box` (leaves nothing under it showing)."""
    left, top, right, bottom = frame.box
    covers = left <= box[0] and top <= box[1] and box[2] <= right and box[3] <= bottom
    return covers and (frame.blend == SOURCE or not see_through)


def _may_be_transparent(colours: Colours) -> bool:
    if colours.colour in (4, 6):
        return True
    if colours.transparency is None:
        return False
    return colours.colour != 3 or any(alpha < 255 for alpha in colours.transparency)


def _zero_is_transparent(colours: Colours) -> bool:
    """Whether the zeros PIL fills a disposed region with are transparent as the frames
    are checked: an alpha channel, or a transparent colour of zeros."""
    if colours.colour in (4, 6):
        return True
    transparency = colours.transparency
    if not transparency:
        return False
    if colours.colour == 3:
        return transparency[0] == 0
    if colours.colour == 0 and colours.depth in (2, 4):  # only the low bits count
        return int.from_bytes(transparency[:2], "big") & ((1 << colours.depth) - 1) == 0
    return not any(transparency)
