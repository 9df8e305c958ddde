"""What enrolment reads of a gallery, without models: which files, which frames, and how
many decoded pixels a chunk may hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from filter.gallery import decode_chunk
from filter.gallery_files import gallery_chunks, header_pixels, list_gallery
from filter.images import ImageLimits, decode_frames


def _frames(count: int, side: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(count)
    return [
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        for _ in range(count)
    ]


def test_a_file_with_more_frames_than_the_limit_keeps_its_first_frames(tmp_path: Path) -> None:
    """A 70-frame GIF was skipped whole ('over the limit of 64'), first frame included: a
    person whose only photo it was stopped being protected."""
    frames = _frames(70)
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    read, unread = decode_frames(gif, ImageLimits(max_images=64))
    assert len(read) == 64 and unread == "frames 65-70 not read: over 64"
    read, unread = decode_frames(gif, ImageLimits(max_pixels=10 * 64 * 64))
    assert len(read) == 10 and unread is not None and "pixels together" in unread
    read, unread = decode_frames(gif)
    assert len(read) == 64 and unread is not None  # the default limit


def test_a_chunk_counts_every_page_at_its_own_size(tmp_path: Path) -> None:
    """Pages were counted at the first page's size: 16 TIFFs of an 8 px page and a large
    one made a single chunk that decoded to far more than its pixel budget."""
    gallery = tmp_path / "gallery" / "alice"
    gallery.mkdir(parents=True)
    small, large = _frames(1, 8)[0], _frames(1, 400)[0]
    for n in range(4):
        small.save(gallery / f"{n}.tif", save_all=True, append_images=[large])
    assert header_pixels(gallery / "0.tif") == 8 * 8 + 400 * 400
    chunks = gallery_chunks(list_gallery(gallery.parent), max_pixels=2 * (8 * 8 + 400 * 400))
    assert [len(chunk) for chunk in chunks] == [2, 2]
    decoded = decode_chunk(gallery.parent, chunks[0])
    assert sum(image.shape[0] * image.shape[1] for image in decoded.images) <= 2 * (
        8 * 8 + 400 * 400
    )
    assert [label for _, label in decoded.labels] == [
        "alice/0.tif",
        "alice/0.tif#frame=2",
        "alice/1.tif",
        "alice/1.tif#frame=2",
    ]


def test_a_file_whose_later_frames_are_left_is_reported_with_its_first_enrolled(
    tmp_path: Path,
) -> None:
    gallery = tmp_path / "gallery" / "bob"
    gallery.mkdir(parents=True)
    frames = _frames(3)
    frames[0].save(gallery / "a.gif", save_all=True, append_images=frames[1:])
    (chunk,) = gallery_chunks(list_gallery(gallery.parent))
    decoded = decode_chunk(gallery.parent, chunk, ImageLimits(max_images=2))
    assert [label for _, label in decoded.labels] == ["bob/a.gif", "bob/a.gif#frame=2"]
    assert decoded.partly == [
        {"path": str(gallery / "a.gif"), "error": "frames 3-3 not read: over 2"}
    ]
    assert decoded.skipped == []


def test_a_symlinked_folder_is_read_once_and_hidden_folders_are_not_identities(
    tmp_path: Path,
) -> None:
    gallery = tmp_path / "gallery"
    (gallery / "carol" / "2019").mkdir(parents=True)
    _frames(1)[0].save(gallery / "carol" / "2019" / "a.png")
    (gallery / "carol" / "again").symlink_to(gallery / "carol" / "2019")
    (gallery / "carol" / "loop").symlink_to(gallery / "carol")
    (gallery / ".cache" / "x").mkdir(parents=True)
    _frames(1)[0].save(gallery / ".cache" / "x" / "b.png")
    listing = list_gallery(gallery)
    assert listing.identities == ["carol"]
    assert [path.relative_to(gallery).as_posix() for _, path in listing.images] == [
        "carol/2019/a.png"
    ]
