"""What a training gallery holds: GALLERY/<identity>/..., one folder per identity.

Every file below an identity folder, in subfolders too (followed through symlinks, each
folder once), is enrolled if it is an image: by its suffix, or, whatever its suffix, by
what its header says (a `.jfif`, a file with no suffix). Nothing is dropped silently:
what is not enrolled (an image beside the identity folders, a file that is not an image) is
listed in `ignored` with the reason, and an identity folder with nothing enrolled from it
is still an identity (`identities_without_faces`). Folders whose name starts with a dot
(`.git`, `.cache`) are not identities.

The chunks (`gallery_chunks`) are what every build embeds in one model call, so that the
same gallery gives the same vectors whichever process embeds it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from filter.errors import FilterError
from filter.images import BATCH_PIXELS, FRAME_FORMATS, IMAGE_SUFFIXES, ImageLimits


@dataclass(frozen=True)
class GalleryListing:
    identities: list[str]  # every identity folder, whether or not anything is enrolled
    images: list[tuple[str, Path]]  # (identity, image file), identities and files sorted
    ignored: list[dict[str, str]]  # {"path", "why"}: files that are not enrolled


def list_gallery(gallery: Path) -> GalleryListing:
    gallery = Path(gallery)
    if not gallery.is_dir():
        raise FilterError(f"gallery {gallery} is not a folder")
    entries = sorted(gallery.iterdir())
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        raise FilterError(f"gallery {gallery} has no identity subfolders (one per identity)")
    ignored = [
        {"path": str(p), "why": "not in an identity folder (GALLERY/<identity>/...)"}
        for p in entries
        if p.is_file() and _is_image(p)
    ]
    images: list[tuple[str, Path]] = []
    for folder in folders:
        for path in _files_below(folder):
            if _is_image(path):
                images.append((folder.name, path))
            else:
                ignored.append({"path": str(path), "why": "not an image"})
    return GalleryListing([folder.name for folder in folders], images, ignored)


def gallery_images(gallery: Path) -> Iterator[tuple[str, Path]]:
    """(identity, image file) for every image enrolled from GALLERY."""
    yield from list_gallery(gallery).images


def _files_below(folder: Path) -> list[Path]:
    """Regular files below `folder`, sorted; symlinked folders followed, each once."""
    seen: set[str] = set()
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # the first name of a folder reached twice is the same on every run
        found.extend(Path(root) / name for name in files if (Path(root) / name).is_file())
    return sorted(found)


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True  # decoding says why, if it is not
    return header_pixels(path) > 0


def header_pixels(path: Path, limits: ImageLimits | None = None) -> int:
    """The pixels enrolment decodes from this file, from its headers alone: every frame's
    (a TIFF's pages each have their own size; counting a GIF's frames may walk it), as
    far as `filter.images.decode_frames` reads them; 0 when PIL does not recognise it
    (decoding will say why)."""
    limits = limits or ImageLimits()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                total = int(getattr(img, "n_frames", 1)) if img.format in FRAME_FORMATS else 1
                pixels = 0
                for index in range(min(total, limits.max_images)):
                    if index:
                        img.seek(index)  # reads the frame's header, not its pixels
                    width, height = img.size
                    pixels += int(width) * int(height)
                    if pixels > limits.max_pixels:
                        break  # decoding stops about here too
                return pixels
    except Exception:  # any unreadable header
        return 0


def gallery_chunks(
    listing: GalleryListing, batch_size: int = 16, max_pixels: int = BATCH_PIXELS
) -> list[list[tuple[str, Path]]]:
    """The gallery's image files in the chunks every build embeds them in (one model call
    each): `batch_size` files, fewer where their frames' pixels (read from the headers)
    would pass `max_pixels`, since a chunk is decoded whole before it is embedded."""
    chunks: list[list[tuple[str, Path]]] = []
    pixels = 0
    for item in listing.images:
        size = header_pixels(item[1])
        if not chunks or len(chunks[-1]) >= batch_size or pixels + size > max_pixels:
            chunks.append([])
            pixels = 0
        chunks[-1].append(item)
        pixels += size
    return chunks
