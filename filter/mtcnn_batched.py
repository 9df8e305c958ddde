"""MTCNN's three stages as batched tensor programs, with facenet-pytorch's own networks.

The algorithm is facenet-pytorch's `detect_face` (pyramid, PNet, RNet, ONet, the same
thresholds, regressions and NMS, except that in the last NMS a box under a third of
another's area does not suppress it: version 3, `filter.nms`), rewritten so that each
stage is one tensor program over every box of every image in the batch:

- one summed-area table of the batch serves every resampling. Area resampling (what
  facenet-pytorch's `interpolate(mode="area")` does) is the mean of a rectangle of source
  pixels per output cell (adaptive average pooling); the table gives each rectangle's
  integer sum exactly, and the division is the one `interpolate` does, so the pyramid
  levels (two slices of the table per level, `_level`) and every RNet/ONet crop (one
  gather per chunk of boxes, `_gather`) are bit-identical to its per-scale and per-box
  calls, without a float copy of the batch or a Python loop over boxes;
- NMS runs for all images at once (`torchvision.ops.nms` with one exact offset per image,
  and a vectorised greedy "Min" NMS for the last stage; `filter/nms.py`);
- memory stays bounded whatever the boxes: RNet/ONet crops are made and run one call
  (at most MAX_ROWS rows) at a time, and no NMS builds a structure quadratic in a whole
  batch's boxes; a pyramid can stop at a largest face (`max_face_size`), which the
  native-resolution windows of `filter/tiling.py` use.

Batch invariance. An image gets exactly the faces it gets when detected alone, whatever
else is in the batch. facenet-pytorch does not promise that (its results move by ~1e-5 px
with the batch), and neither do the CPU kernels, so three things are pinned here:
- oneDNN takes another convolution kernel for a batch of one image, so PNet never runs on
  one image (a blank second image is added, its output dropped);
- RNet and ONet run on row counts padded to a multiple of `ROW_QUANTUM` and split into
  calls of at most `NET_ROWS` rows: on the CPU a row gets the same bits in every such
  call and position (a test checks it), not in small or odd row counts, nor in calls of
  256 rows or more on every CPU (an AMX-capable Xeon takes another ONet kernel there).
  The CPU's small calls (64 rows) also keep a layer's activations in cache: ONet on 512
  rows writes 138 MB per layer, and ran 2-3x slower than in calls of 64;
- NMS offsets are exact (`filter.nms.grouped_nms`): a box's overlap with its neighbours
  does not depend on its image's place in the batch (torchvision's `batched_nms` derives
  the offset from the batch's largest coordinate, which rounds differently).
The GPU kernels make no such promise; there the invariance is only approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from filter.nms import chunks, grouped_nms, min_nms

NAME = "mtcnn-batched"
# Bump when a change can move a box or a landmark: the index manifest records it, and an
# index built with another version is refused. 2: images over max_side are also searched
# at native resolution (filter/tiling.py); images of max_side or less detect as in 1.
# 3: in the last NMS a box under a third of another's area no longer suppresses it
# (filter/nms.py, ENCLOSED_AREA_RATIO), so both are kept (and a box the larger one then
# suppresses is not); the rest as in 2. No box moved on the equivalence sets.
VERSION = "3"

ROW_QUANTUM = 16
# Boxes whose crops are made at once (the bound on the crops' memory).
MAX_ROWS = 512
# Rows per RNet/ONet call, by device: multiples of ROW_QUANTUM, so the bits do not depend
# on it. Small on the CPU (the activations stay in cache), large on a GPU (fewer launches).
NET_ROWS = {"cpu": 64, "cuda": MAX_ROWS}


@dataclass(frozen=True)
class Detections:
    """Faces found in a batch, in detection-copy pixels: rows are faces, `image` says whose."""

    boxes: torch.Tensor  # (K, 5) float32: x1, y1, x2, y2, score
    points: torch.Tensor  # (K, 5, 2) float32: five landmarks (x, y)
    image: torch.Tensor  # (K,) int64: index of the image in the batch


def pyramid_scales(
    height: int,
    width: int,
    min_face_size: float,
    factor: float,
    max_face_size: float | None = None,
) -> list[float]:
    """facenet-pytorch's scale list, to the same floating-point steps; with
    `max_face_size`, only its first levels: those whose face size (12 / scale) is at most
    that (the native-resolution passes search only the faces the coarser ones cannot)."""
    m = 12.0 / min_face_size
    minl = min(height, width) * m
    scales = []
    scale = m
    while minl >= 12:
        if max_face_size is not None and 12.0 / scale > max_face_size:
            break
        scales.append(scale)
        scale *= factor
        minl *= factor
    return scales


def detect_batch(
    images: torch.Tensor,
    min_face_size: float,
    nets: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module],
    thresholds: tuple[float, float, float],
    factor: float,
    max_face_size: float | None = None,
) -> Detections:
    """Detect faces in a (N, H, W, 3) uint8 batch of equal-size RGB images (faces from
    `min_face_size` up to `max_face_size` pixels, or of any size)."""
    pnet, rnet, onet = nets
    height, width = images.shape[1], images.shape[2]
    table = _summed_area_table(images)
    boxes, image = _stage_one(
        images, table, pnet, min_face_size, thresholds[0], factor, max_face_size
    )
    boxes = _rerec(_apply_pnet_regression(boxes))
    empty = Detections(
        boxes=torch.zeros((0, 5), device=images.device),
        points=torch.zeros((0, 5, 2), device=images.device),
        image=torch.zeros(0, dtype=torch.int64, device=images.device),
    )
    if len(boxes) == 0:
        return empty

    # Stage two: RNet on 24x24 crops of every candidate.
    boxes, image, (reg, prob) = _refine(rnet, table, boxes, image, 24, height, width)
    passed = prob[:, 1] > thresholds[1]
    boxes = torch.cat([boxes[passed, :4], prob[passed, 1:2]], dim=1)
    image, reg = image[passed], reg[passed]
    keep = grouped_nms(boxes, image, 0.7)
    boxes = _rerec(_bbreg(boxes[keep], reg[keep]))
    image = image[keep]
    if len(boxes) == 0:
        return empty

    # Stage three: ONet on 48x48 crops; landmarks come from the box before regression.
    boxes, image, (reg, marks, prob) = _refine(onet, table, boxes, image, 48, height, width)
    passed = prob[:, 1] > thresholds[2]
    boxes = torch.cat([boxes[passed, :4], prob[passed, 1:2]], dim=1)
    image, reg, marks = image[passed], reg[passed], marks[passed]
    box_w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    box_h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    points_x = box_w * marks[:, :5] + boxes[:, 0:1] - 1
    points_y = box_h * marks[:, 5:10] + boxes[:, 1:2] - 1
    points = torch.stack([points_x, points_y], dim=2)
    boxes = _bbreg(boxes, reg)
    keep = min_nms(boxes, image, 0.7)
    return Detections(boxes=boxes[keep], points=points[keep], image=image[keep])


def _stage_one(
    images: torch.Tensor,
    table: torch.Tensor,
    pnet: torch.nn.Module,
    min_face_size: float,
    threshold: float,
    factor: float,
    max_face_size: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PNet over the pyramid: candidate boxes (x1, y1, x2, y2, score, 4 regressions) and
    their image indices, after facenet-pytorch's per-scale and per-image NMS."""
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    scale_boxes: list[torch.Tensor] = []
    scale_images: list[torch.Tensor] = []
    for scale in pyramid_scales(height, width, min_face_size, factor, max_face_size):
        level = _level(images, table, int(height * scale + 1), int(width * scale + 1))
        if count == 1:
            level = torch.cat([level, torch.zeros_like(level)])
        reg, prob = pnet(level)
        boxes, image = _generate_boxes(reg[:count], prob[:count, 1], scale, threshold)
        keep = grouped_nms(boxes, image, 0.5)
        scale_boxes.append(boxes[keep])
        scale_images.append(image[keep])
    if not scale_boxes:
        return torch.zeros((0, 9), device=images.device), torch.zeros(
            0, dtype=torch.int64, device=images.device
        )
    boxes, image = torch.cat(scale_boxes), torch.cat(scale_images)
    keep = grouped_nms(boxes, image, 0.7)
    return boxes[keep], image[keep]


def _level(images: torch.Tensor, table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The batch area-resampled to rows x cols and normalised, (N, 3, rows, cols) in
    channels-last memory: facenet-pytorch's `interpolate(mode="area")` to the bit. Every
    cell's sum is two row slices and two column slices of the summed-area table; the
    division is adaptive average pooling's (sum / rows / cols). Pooling sums a cell in
    float32, exactly while the sum stays below 2^24, which every MTCNN level's cells do;
    a level with larger cells (an image thousands of pixels a side searched whole) is
    pooled as before."""
    height, width = images.shape[1], images.shape[2]
    row0, row1 = _axis_bounds(height, rows)
    col0, col1 = _axis_bounds(width, cols)
    largest = max(b - a for a, b in zip(row0, row1, strict=True)) * max(
        b - a for a, b in zip(col0, col1, strict=True)
    )
    if largest * 255 >= 2**24:
        level = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(rows, cols), mode="area")
        return (level - 127.5) * 0.0078125
    device = table.device
    r0, r1, c0, c1 = (torch.tensor(v, device=device) for v in (row0, row1, col0, col1))
    strips = table.index_select(1, r1) - table.index_select(1, r0)
    sums = strips.index_select(2, c1) - strips.index_select(2, c0)  # (N, rows, cols, 3)
    area_rows = (r1 - r0).float()[:, None, None]
    area_cols = (c1 - c0).float()[:, None]
    cells = sums.float() / area_rows / area_cols
    return ((cells - 127.5) * 0.0078125).permute(0, 3, 1, 2)


def _axis_bounds(length: int, size: int) -> tuple[list[int], list[int]]:
    """Adaptive average pooling's source range [begin, end) of each of `size` cells over
    `length` pixels: floor(i * L / S) to ceil((i + 1) * L / S)."""
    begin = [(i * length) // size for i in range(size)]
    end = [-((-(i + 1) * length) // size) for i in range(size)]
    return begin, end


def _generate_boxes(
    reg: torch.Tensor, prob: torch.Tensor, scale: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """facenet-pytorch's `generateBoundingBox`: one 12x12 window per PNet cell over the
    threshold, mapped back to image pixels."""
    stride, cell = 2, 12
    mask = prob >= threshold
    where = mask.nonzero()
    image = where[:, 0]
    score = prob[mask]
    offsets = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    corner = where[:, 1:].to(reg.dtype).flip(1)
    q1 = ((stride * corner + 1) / scale).floor()
    q2 = ((stride * corner + cell - 1 + 1) / scale).floor()
    return torch.cat([q1, q2, score.unsqueeze(1), offsets], dim=1), image


def _apply_pnet_regression(boxes: torch.Tensor) -> torch.Tensor:
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    return torch.stack(
        [
            boxes[:, 0] + boxes[:, 5] * width,
            boxes[:, 1] + boxes[:, 6] * height,
            boxes[:, 2] + boxes[:, 7] * width,
            boxes[:, 3] + boxes[:, 8] * height,
            boxes[:, 4],
        ],
        dim=1,
    )


def _bbreg(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    moved = torch.stack(
        [
            boxes[:, 0] + reg[:, 0] * width,
            boxes[:, 1] + reg[:, 1] * height,
            boxes[:, 2] + reg[:, 2] * width,
            boxes[:, 3] + reg[:, 3] * height,
        ],
        dim=1,
    )
    return torch.cat([moved, boxes[:, 4:]], dim=1)


def _rerec(boxes: torch.Tensor) -> torch.Tensor:
    """Square each box around its centre (facenet-pytorch's `rerec`, same operations)."""
    height = boxes[:, 3] - boxes[:, 1]
    width = boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(width, height)
    x1 = boxes[:, 0] + width * 0.5 - side * 0.5
    y1 = boxes[:, 1] + height * 0.5 - side * 0.5
    return torch.cat([torch.stack([x1, y1, x1 + side, y1 + side], dim=1), boxes[:, 4:]], dim=1)


def _summed_area_table(images: torch.Tensor) -> torch.Tensor:
    """(N, H+1, W+1, 3) prefix sums: any rectangle's pixel sum in four lookups, exactly.

    Every entry is an integer. float32 holds them exactly below 2^24 (copies up to about
    256x256, the generated-face path) and is the fastest cumsum here; int32 holds larger
    copies (up to ~8.4M pixels, far above max_side)."""
    count, height, width, _ = images.shape
    total = height * width * 255
    dtype = torch.float32 if total < 2**24 else torch.int32 if total < 2**31 else torch.int64
    # In place inside the table, along the row first: the same integers in any order, with
    # no second buffer of the batch to fill and copy (fresh cumsums took half again longer).
    table = torch.empty((count, height + 1, width + 1, 3), dtype=dtype, device=images.device)
    table[:, 0].zero_()
    table[:, 1:, 0].zero_()
    sums = table[:, 1:, 1:]
    sums.copy_(images)
    torch.cumsum(sums, 2, out=sums)
    torch.cumsum(sums, 1, out=sums)
    return table


def _pixel_bounds(
    boxes: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """facenet-pytorch's `pad`: truncate, clip the top-left to 1 and the bottom-right to the
    image; a box that then covers no pixel is invalid (it would crash facenet-pytorch).
    Returns x, y, ex, ey (1-based, inclusive) and the mask of valid boxes."""
    corners = boxes[:, :4].trunc().int()
    x = corners[:, 0].clamp(min=1)
    y = corners[:, 1].clamp(min=1)
    ex = corners[:, 2].clamp(max=width)
    ey = corners[:, 3].clamp(max=height)
    return x, y, ex, ey, (ey > y - 1) & (ex > x - 1)


def _crops(
    table: torch.Tensor,
    boxes: torch.Tensor,
    image: torch.Tensor,
    size: int,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every box's crop, area-resampled to size x size and normalised, as one gather:
    (B', 3, size, size) for the B' boxes that overlap the image, and the mask of those."""
    x, y, ex, ey, valid = _pixel_bounds(boxes, height, width)
    return _gather(table, x[valid], y[valid], ex[valid], ey[valid], image[valid], size), valid


def _refine(
    net: torch.nn.Module,
    table: torch.Tensor,
    boxes: torch.Tensor,
    image: torch.Tensor,
    size: int,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """RNet or ONet on every box that overlaps the image: (those boxes, their image
    indices, the network's outputs). Crops are made one `_run_rows` call (NET_ROWS rows) at
    a time: bounded memory, the same bits, and on the CPU a gather that stays in cache."""
    x, y, ex, ey, valid = _pixel_bounds(boxes, height, width)
    boxes, image = boxes[valid], image[valid]
    x, y, ex, ey = x[valid], y[valid], ex[valid], ey[valid]
    step = NET_ROWS.get(table.device.type, MAX_ROWS)
    parts = [
        _run_rows(net, _gather(table, x[i:j], y[i:j], ex[i:j], ey[i:j], image[i:j], size), step)
        for i, j in chunks(len(boxes), step)
    ]
    return boxes, image, tuple(torch.cat(out) for out in zip(*parts, strict=True))


def _gather(
    table: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    ex: torch.Tensor,
    ey: torch.Tensor,
    image: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Crops of the given pixel rectangles, area-resampled to size x size and normalised:
    (B, 3, size, size), from four lookups per output cell in the summed-area table."""
    rows0, rows1 = _cell_bounds(y - 1, ey - y + 1, size)
    cols0, cols1 = _cell_bounds(x - 1, ex - x + 1, size)
    # One flat gather for the four corners of every cell of every box.
    stride = table.shape[2]
    base = (image * (table.shape[1] * stride))[:, None, None]
    rows = torch.stack([rows0, rows1])[:, :, :, None] * stride + base  # (2, B, S, 1)
    cols = torch.stack([cols0, cols1])[:, :, None, :]  # (2, B, 1, S)
    corners = (rows[:, None] + cols[None]).reshape(-1)
    v = table.view(-1, 3).index_select(0, corners).view(2, 2, len(image), size, size, 3)
    # The same operations, in the same order, as out of place, but on one buffer: the
    # crops of a chunk are megabytes, and fresh buffers cost page faults on the CPU.
    sums = v[1, 1] - v[0, 1]
    sums.sub_(v[1, 0]).add_(v[0, 0])  # exact: integers, in the table's own dtype
    crops = sums.float()
    # The same float32 division as adaptive average pooling: sum / rows / cols.
    crops.div_((rows1 - rows0).float()[:, :, None, None])
    crops.div_((cols1 - cols0).float()[:, None, :, None])
    crops.sub_(127.5).mul_(0.0078125)
    return crops.permute(0, 3, 1, 2)


def _cell_bounds(
    start: torch.Tensor, length: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ranges [begin, end) of each output cell, as adaptive average pooling draws
    them: floor(i * L / S) to ceil((i + 1) * L / S)."""
    i = torch.arange(size, device=start.device, dtype=torch.int64)
    length = length.to(torch.int64)[:, None]
    begin = (i * length) // size
    end = -((-(i + 1) * length) // size)
    base = start.to(torch.int64)[:, None]
    return base + begin, base + end


def _run_rows(
    net: torch.nn.Module, rows: torch.Tensor, step: int = MAX_ROWS
) -> tuple[torch.Tensor, ...]:
    """The network over every row, in calls of at most `step` rows (a multiple of
    ROW_QUANTUM), shapes that give each row the same bits whatever the other rows are (see
    the module docstring)."""
    count = len(rows)
    padded = max(ROW_QUANTUM, math.ceil(count / ROW_QUANTUM) * ROW_QUANTUM)
    if padded != count:
        rows = torch.cat([rows, rows.new_zeros((padded - count, *rows.shape[1:]))])
    rows = rows.contiguous(memory_format=torch.channels_last)
    if step % ROW_QUANTUM:
        raise ValueError(f"rows per call must be a multiple of {ROW_QUANTUM}, not {step}")
    parts = [net(rows[i : i + step]) for i in range(0, padded, step)]
    return tuple(torch.cat(outputs)[:count] for outputs in zip(*parts, strict=True))
