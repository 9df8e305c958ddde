"""The content rule: a file passes only if everything it can show was checked.

`read_content` finds every image a file can show and says what it could not account
for:

- every frame or page (GIF, APNG, animated WebP, multi-page TIFF), as a viewer composes
  it; MPO images through the MPF index;
- for a frame with transparent pixels, also the colour channels under them (a program
  that drops the alpha channel shows them; the filter otherwise sees the frame over white)
  and the frame over black (a dark page shows white drawn on transparency);
- for a frame whose colour profile (ICC, PNG gAMA/cHRM) changes what a viewer shows, the
  frame as managed (`filter.colour_views`);
- every thumbnail and embedded image its structure holds (EXIF thumbnails, compressed or
  as uncompressed strips; JFIF/JFXX, Photoshop and XMP thumbnails; TIFF SubIFDs) and any
  image file, or base64 image, found in free-form metadata (text, comments, ICC
  profiles, EXIF values and MakerNotes, C2PA boxes);
- and, as `unaccounted`, bytes it cannot vouch for: data after the end of the image,
  chunks, segments, blocks or extensions it does not read, an embedded image it cannot
  decode, a format whose structure it does not read, more images than it checks per file.

`filter.file_check` checks every image and rejects a file with anything unaccounted
(`unchecked_content`). `facegate check` and `facegate batch` use it; enrolment,
calibration and evaluation read the first frame only (`decode_image`). What is left out on
purpose: pixel values themselves (a picture hidden in the low bits of another is
steganography, not something a viewer shows) and raw headerless bytes inside free-form
metadata, which no viewer shows either: batch copies therefore hold only the checked
pixels, re-encoded, unless the operator asks for the original bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from filter.containers import walk
from filter.content_scan import Embedded, Layout, trailing
from filter.errors import ImageError
from filter.images import (
    DECODE_ERRORS,
    FRAME_FORMATS,
    FrameViews,
    ImageLimits,
    check_pixels,
    frame_views,
    opened_image,
    read_image_bytes,
)
from filter.pil_quirks import prepare_frame

# Formats whose later frames or pages PIL decodes. An MPO's later images are found through
# its MPF index (filter.containers), so that each is walked for its own thumbnails.
ACCOUNTED_FORMATS = "PNG, JPEG, MPO, GIF, WebP, TIFF, BMP and PNM"
MAX_DEPTH = 3  # an image inside an image inside an image
MAX_REASONS = 8  # unaccounted reasons kept per file (the first ones)
# zlib level of re-encoded copies: level 1 encoded a 1024x1024 photo 8x faster than PIL's
# default 6, 23 % larger (docs/batch.md); a copy can be recompressed losslessly later.
COPY_COMPRESS_LEVEL = 1
# APNG stores a frame's delay in 16 bits of milliseconds (as PIL writes it) and the loop
# count in 32: a longer frame of a GIF or WebP is copied at the longest APNG can say.
APNG_MAX_DELAY_MS = 65_535
APNG_MAX_LOOP = 2**31 - 1
# Embedded images a file may ask the reader to try: a payload stuffed with signatures
# would otherwise cost one decode attempt each.
MAX_EMBEDDED = 256
_FRAME_ERRORS: tuple[type[BaseException], ...] = (
    *DECODE_ERRORS,
    ImageError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@dataclass(frozen=True)
class ImageView:
    """One image a file can show, as the filter checks it."""

    name: str  # "image", "frame 2", "page 3", "EXIF thumbnail", ...
    pixels: np.ndarray  # HxWx3 uint8


@dataclass(frozen=True)
class FileContent:
    format: str
    views: tuple[ImageView, ...]  # views[0] is what `decode_image` gives
    frames: int  # views[:frames] are the file's own frames or pages, as displayed
    unaccounted: tuple[str, ...] = ()
    durations: tuple[int, ...] = ()  # milliseconds per frame (0: not given)
    loop: int = 0

    @property
    def complete(self) -> bool:
        """Whether every byte was accounted for (and every image it shows is in `views`)."""
        return not self.unaccounted


def read_content(source: bytes, limits: ImageLimits | None = None) -> FileContent:
    """Every image `source` can show, and what could not be accounted for. ImageError
    (an `unreadable` file) only when its first image cannot be decoded."""
    limits = limits or ImageLimits()
    data = read_image_bytes(source, limits)
    reader = _Reader(limits)
    with opened_image(data, limits) as img:
        image_format = img.format or "unknown"
        durations, loop = reader.frames(img, image_format, "", top=True)
    frames = len(reader.views)
    reader.structure(data, image_format, Embedded("", data), depth=0)
    return FileContent(
        format=image_format,
        views=tuple(reader.views + reader.extra),
        frames=frames,
        unaccounted=tuple(dict.fromkeys(reader.unaccounted))[:MAX_REASONS],
        durations=tuple(durations),
        loop=loop,
    )


@dataclass
class _Reader:
    limits: ImageLimits
    views: list[ImageView] = field(default_factory=list)  # the file's own frames
    extra: list[ImageView] = field(default_factory=list)  # everything else it shows
    unaccounted: list[str] = field(default_factory=list)
    pixels: int = 0
    full: bool = False  # the budget is spent: nothing more is decoded
    attempts: int = 0  # embedded images tried

    def add(self, name: str, pixels: np.ndarray, own_frame: bool = False) -> None:
        count = len(self.views) + len(self.extra)
        area = int(pixels.shape[0]) * int(pixels.shape[1])
        if count >= self.limits.max_images or self.pixels + area > self.limits.max_pixels:
            if not self.full:
                self.unaccounted.append(
                    f"from {name} on: more images than facegate checks in one file "
                    f"({self.limits.max_images} images, {self.limits.max_pixels} pixels)"
                )
            self.full = True
            return
        self.pixels += area
        (self.views if own_frame else self.extra).append(ImageView(name, pixels))

    def frames(
        self, img: Image.Image, image_format: str, name: str, top: bool = False
    ) -> tuple[list[int], int]:
        """Decode every frame of an opened image. The first frame of the file itself must
        decode (its errors propagate: the file is unreadable); any other failure is
        recorded as unaccounted. The first frame is decoded before the frames are counted
        (counting walks the file), so that it is exactly what `decode_image` gives."""
        first = self._decode(img, 0, name or "image", top)
        total = 1
        if image_format in FRAME_FORMATS:
            try:  # counting may read the whole file
                total = int(getattr(img, "n_frames", 1))
            except DECODE_ERRORS as exc:
                self.unaccounted.append(f"{_join(name, 'its frames')} cannot be counted: {exc}")
        unit = "page" if image_format == "TIFF" else "frame"
        durations: list[int] = []
        for index in range(total):
            if self.full:
                break
            label = _join(name, f"{unit} {index + 1}" if total > 1 else "") or "image"
            decoded = first if index == 0 else self._decode(img, index, label, top)
            if decoded is None:
                continue
            views, duration = decoded
            self.add(label, views.shown, own_frame=top)
            for other_name, other in views.others:
                self.add(f"{label}, {other_name}", other)
            self.unaccounted += [f"{label} has {problem}" for problem in views.problems]
            durations.append(duration)
        loop = img.info.get("loop")
        return durations, int(loop) if isinstance(loop, int) else (1 if total > 1 else 0)

    def _decode(
        self, img: Image.Image, index: int, label: str, top: bool
    ) -> tuple[FrameViews, int] | None:
        try:
            if index:
                img.seek(index)
                prepare_frame(img)
            check_pixels(img, self.limits)
            img.load()
            views = frame_views(img)
        except _FRAME_ERRORS as exc:
            if top and index == 0:
                raise
            self.unaccounted.append(f"{label} cannot be decoded: {exc}")
            return None
        return views, int(img.info.get("duration") or 0)

    def structure(self, data: bytes, image_format: str, found: Embedded, depth: int) -> int:
        """Walk the container; record what it holds. Returns where its structure ends."""
        layout = Layout()
        if not walk(image_format, data, layout):
            self.unaccounted.append(
                _join(
                    found.name,
                    f"a {image_format} image, whose structure facegate does not "
                    f"account for (it reads {ACCOUNTED_FORMATS})",
                )
            )
            return len(data)
        end = len(data) if layout.end is None else layout.end
        if layout.end is not None and not found.host_after_end:
            left = trailing(data, layout.end, image_format)
            if left is not None:
                self.unaccounted.append(_join(found.name, left))
        self.unaccounted += [_join(found.name, what) for what in layout.unaccounted]
        for name, rgb, width, height in layout.raw:
            label = _join(found.name, name)
            if len(rgb) != 3 * width * height:
                self.unaccounted.append(f"{label} is truncated")
            else:
                pixels = np.frombuffer(rgb, np.uint8).reshape(height, width, 3).copy()
                self.add(label, pixels)
        claimed: dict[int, int] = {}
        for embedded in layout.embedded:
            if embedded.group and embedded.offset < claimed.get(embedded.group, 0):
                continue  # inside an image already read: that image's walk covers it
            named = Embedded(
                _join(found.name, embedded.name),
                embedded.data,
                embedded.whole_file,
                embedded.host_after_end,
                embedded.group,
                embedded.offset,
                embedded.swap_red_blue,
            )
            used = self.embedded(named, depth + 1)
            if embedded.group:
                claimed[embedded.group] = embedded.offset + max(used, 1)
        return end

    def embedded(self, found: Embedded, depth: int) -> int:
        """Decode and walk an embedded image; returns how many bytes it spans (0: none)."""
        if self.full:
            return 0
        self.attempts += 1
        if self.attempts > MAX_EMBEDDED:
            self.unaccounted.append(
                f"more than {MAX_EMBEDDED} embedded images, from {found.name} on"
            )
            self.full = True
            return 0
        if depth > MAX_DEPTH:
            self.unaccounted.append(f"{found.name} is nested deeper than facegate reads")
            return 0
        first = len(self.extra)
        try:
            with opened_image(found.data, self.limits) as img:
                image_format = img.format or "unknown"
                self.frames(img, image_format, found.name)
        except ImageError as exc:
            self.unaccounted.append(f"{found.name} cannot be decoded: {exc}")
            return 0
        if found.swap_red_blue:
            self.extra[first:] = [
                ImageView(v.name, np.ascontiguousarray(v.pixels[..., ::-1]))
                for v in self.extra[first:]
            ]
        if not found.whole_file:
            return len(found.data)
        return self.structure(found.data, image_format, found, depth)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}, {name}" if prefix and name else prefix or name


def checked_pixels_png(content: FileContent) -> bytes:
    """The file's frames exactly as the filter checked them, as a PNG (an APNG when it
    has several frames or pages), with no metadata: no EXIF, text, ICC profile or
    thumbnail. Frames of different sizes are placed top left on a white canvas."""
    frames = [Image.fromarray(view.pixels, "RGB") for view in content.views[: content.frames]]
    buffer = io.BytesIO()
    if len(frames) == 1:
        frames[0].save(buffer, "PNG", compress_level=COPY_COMPRESS_LEVEL)
        return buffer.getvalue()
    width = max(frame.width for frame in frames)
    height = max(frame.height for frame in frames)
    canvases = []
    for frame in frames:
        if frame.size != (width, height):
            canvas = Image.new("RGB", (width, height), (255, 255, 255))
            canvas.paste(frame, (0, 0))
            frame = canvas
        canvases.append(frame)
    durations = list(content.durations) + [0] * (len(frames) - len(content.durations))
    canvases[0].save(
        buffer,
        "PNG",
        compress_level=COPY_COMPRESS_LEVEL,
        save_all=True,
        append_images=canvases[1:],
        duration=[min(d, APNG_MAX_DELAY_MS) if d > 0 else 100 for d in durations],
        loop=min(max(content.loop, 0), APNG_MAX_LOOP),
        disposal=0,
        blend=0,
    )
    return buffer.getvalue()
