"""Animated GIF and APNG probes for frame composition, built byte by byte (PIL's writers
choose their own disposal, transparency and frame rectangles), with the frames a browser
shows: a GIF as Chromium (Skia) composes it, an APNG as its specification does. Both start
from a transparent canvas; GIF disposal 2 and APNG dispose_op BACKGROUND clear to
transparency, GIF disposal 3 and 4 and APNG PREVIOUS restore the canvas as it was before
the frame (BACKGROUND for an APNG's first frame)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

Colour = tuple[int, int, int]


def pattern(size: int) -> np.ndarray:
    """A face-like mask: a disc with two eyes and a mouth cut out."""
    y, x = np.mgrid[:size, :size] / size
    mask = (y - 0.5) ** 2 + (x - 0.5) ** 2 < 0.16
    for eye in (0.35, 0.65):
        mask &= (y - 0.4) ** 2 + (x - eye) ** 2 >= 0.0036
    mask &= ~((abs(y - 0.68) < 0.04) & (abs(x - 0.5) < 0.18))
    return np.asarray(mask)


def over_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(float) / 255
    return np.asarray((rgba[..., :3] * alpha + 255 * (1 - alpha)).round().astype(int))


# GIF ---------------------------------------------------------------------------------


@dataclass
class GifFrame:
    indices: np.ndarray  # rows of palette indices
    x: int = 0
    y: int = 0
    disposal: int = 0
    transparency: int | None = None  # the transparent index
    palette: list[Colour] | None = None  # a local colour table
    control: bool = True  # written with a Graphic Control Extension


def _colour_table(palette: list[Colour]) -> tuple[int, bytes]:
    bits = max(1, (len(palette) - 1).bit_length())
    table = b"".join(bytes(c) for c in palette)
    return bits - 1, table + b"\x00" * (3 * (1 << bits) - len(table))


def _lzw(indices: np.ndarray) -> bytes:
    """Uncompressed LZW (a clear code every 250 codes keeps the codes 9 bits wide)."""
    codes: list[int] = []
    for at, value in enumerate(indices.reshape(-1).tolist()):
        if at % 250 == 0:
            codes.append(256)
        codes.append(value)
    codes.append(257)
    data, bits, held = bytearray(), 0, 0
    for code in codes:
        bits |= code << held
        held += 9
        while held >= 8:
            data.append(bits & 0xFF)
            bits >>= 8
            held -= 8
    if held:
        data.append(bits)
    blocks = b"".join(
        bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)
    )
    return b"\x08" + blocks + b"\x00"


def gif(
    size: tuple[int, int],
    palette: list[Colour] | None,
    frames: list[GifFrame],
    background: int = 0,
) -> bytes:
    """A GIF89a of these frames; `palette` None: no global colour table."""
    flags, table = (0, b"") if palette is None else _colour_table(palette)
    flags |= 0x80 if palette is not None else 0
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", *size, flags, background, 0) + table)
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for frame in frames:
        if frame.control:
            packed = frame.disposal << 2 | (frame.transparency is not None)
            out += b"\x21\xf9\x04" + struct.pack("<BHB", packed, 10, frame.transparency or 0)
            out += b"\x00"
        local, local_table = (0, b"") if frame.palette is None else _colour_table(frame.palette)
        local |= 0x80 if frame.palette is not None else 0
        height, width = frame.indices.shape
        out += b"\x2c" + struct.pack("<HHHHB", frame.x, frame.y, width, height, local)
        out += local_table + _lzw(frame.indices)
    return bytes(out + b"\x3b")


def gif_as_browsers_show(
    size: tuple[int, int], palette: list[Colour], frames: list[GifFrame]
) -> list[np.ndarray]:
    """Each frame as RGBA, composed as Chromium (Skia) does."""
    canvas = np.zeros((size[1], size[0], 4), np.uint8)
    shown = []
    for frame in frames:
        before = canvas.copy()
        colours = np.array(frame.palette or palette, np.uint8)
        height, width = frame.indices.shape
        region = canvas[frame.y : frame.y + height, frame.x : frame.x + width]
        drawn = frame.indices != (-1 if frame.transparency is None else frame.transparency)
        region[drawn, :3] = colours[frame.indices[drawn]]
        region[drawn, 3] = 255
        shown.append(canvas.copy())
        if frame.disposal == 2:
            region[...] = 0
        elif frame.disposal in (3, 4):
            canvas = before
    return shown


# APNG --------------------------------------------------------------------------------


@dataclass
class ApngFrame:
    samples: np.ndarray  # rows of 8-bit samples: HxW (grey, palette) or HxWxC
    x: int = 0
    y: int = 0
    dispose: int = 0  # NONE, BACKGROUND, PREVIOUS
    blend: int = 0  # SOURCE, OVER


@dataclass
class ApngImage:
    size: tuple[int, int]
    colour: int  # IHDR colour type: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA
    frames: list[ApngFrame]
    palette: list[Colour] | None = None
    transparency: bytes | None = None  # the tRNS body
    default: np.ndarray | None = None  # a default image that is not a frame


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _rows(samples: np.ndarray) -> bytes:
    flat = samples.reshape(samples.shape[0], -1).astype(np.uint8)
    return zlib.compress(b"".join(b"\x00" + row.tobytes() for row in flat))


def apng(image: ApngImage) -> bytes:
    ihdr = struct.pack(">IIBBBBB", *image.size, 8, image.colour, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    out += _chunk(b"acTL", struct.pack(">II", len(image.frames), 0))
    if image.palette is not None:
        out += _chunk(b"PLTE", b"".join(bytes(c) for c in image.palette))
    if image.transparency is not None:
        out += _chunk(b"tRNS", image.transparency)
    if image.default is not None:
        out += _chunk(b"IDAT", _rows(image.default))
    sequence = 0
    for number, frame in enumerate(image.frames):
        height, width = frame.samples.shape[:2]
        control = (sequence, width, height, frame.x, frame.y, 1, 10, frame.dispose, frame.blend)
        out += _chunk(b"fcTL", struct.pack(">IIIIIHHBB", *control))
        sequence += 1
        if number == 0 and image.default is None:
            out += _chunk(b"IDAT", _rows(frame.samples))
        else:
            out += _chunk(b"fdAT", struct.pack(">I", sequence) + _rows(frame.samples))
            sequence += 1
    return out + _chunk(b"IEND", b"")


def _rgba(image: ApngImage, samples: np.ndarray) -> np.ndarray:
    """A frame's samples as RGBA floats, tRNS applied."""
    opaque = np.full(samples.shape[:2], 255.0)
    trns = image.transparency
    if image.colour == 6:
        return samples.astype(float)
    if image.colour == 4:
        grey = samples[..., 0].astype(float)
        return np.dstack([grey, grey, grey, samples[..., 1]])
    if image.colour == 3:
        assert image.palette is not None
        colours = np.array(image.palette, float)
        alpha = np.full(len(colours), 255.0)
        alpha[: len(trns or b"")] = list(trns or b"")
        return np.dstack([colours[samples], alpha[samples]])
    grey = np.dstack([samples] * 3) if image.colour == 0 else samples
    if trns is not None:
        key = struct.unpack(">H" if image.colour == 0 else ">HHH", trns)
        opaque[(grey == np.array(key)).all(-1)] = 0
    return np.dstack([grey.astype(float), opaque])


def apng_as_browsers_show(image: ApngImage) -> list[np.ndarray]:
    """Each frame as RGBA, composed as the APNG specification says."""
    canvas = np.zeros((image.size[1], image.size[0], 4))
    shown = []
    for number, frame in enumerate(image.frames):
        before = canvas.copy()
        source = _rgba(image, frame.samples)
        height, width = source.shape[:2]
        region = canvas[frame.y : frame.y + height, frame.x : frame.x + width]
        if frame.blend == 0:
            region[...] = source
        else:
            alpha, under = source[..., 3:] / 255, region[..., 3:] / 255
            total = alpha + under * (1 - alpha)
            mixed = source[..., :3] * alpha + region[..., :3] * under * (1 - alpha)
            region[..., :3] = np.where(total > 0, mixed / np.maximum(total, 1e-9), 0)
            region[..., 3:] = total * 255
        shown.append(canvas.round().astype(np.uint8))
        dispose = 1 if frame.dispose == 2 and number == 0 else frame.dispose
        if dispose == 1:
            region[...] = 0
        elif dispose == 2:
            canvas = before
    return shown
