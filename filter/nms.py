"""Non-maximum suppression for the batched MTCNN, exact and in bounded memory.

- `grouped_nms`: greedy IoU NMS within each group (image) for a whole batch in one
  `torchvision.ops.nms` call, groups kept apart by exact offsets;
- `min_nms`: facenet-pytorch's last NMS ("Min": intersection over the smaller box), except
  that a box under a third of another's area never suppresses it (`ENCLOSED_AREA_RATIO`).
Neither builds a structure quadratic in a whole batch's boxes: above NMS_MAX_BOXES the
IoU NMS runs in calls per chunk of groups, above NMS_BLOCK the Min NMS runs per group, a
block of boxes at a time against those already kept. Both give exactly what one call over
every box gives (`tests/models/test_mtcnn_batched.py`).
"""

from __future__ import annotations

import math

import torch
import torchvision

# Boxes per IoU NMS call and per block of the Min NMS: memory bounds, not results.
NMS_MAX_BOXES = 16_384
NMS_BLOCK = 1024
# In the last NMS a box suppresses another only if its area is at least this fraction of
# the other's. MTCNN's "Min" overlap of a box inside a larger one is 1, so a small false
# detection inside a face (part of it, scored higher) removed the face's own box, and the
# face was searched through that crop only (1 of 6,144 generated faces, README "The
# detector"); duplicates of one face are boxes of about one size and are still merged.
ENCLOSED_AREA_RATIO = 1 / 3
# NMS coordinates are snapped to this grid (1/65536 px) so that adding a per-image offset
# is exact in float64; the snap moves a box by at most 2^-17 px, below float32 rounding
# of the coordinates themselves.
_NMS_GRID = 2.0**16
_EXACT_LIMIT = 2.0**36  # |coordinate + offset| * grid below 2^52: float64 sums stay exact


def chunks(count: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `size` covering `count`; one empty range for 0, so
    that an empty input still yields outputs of the right shapes."""
    return [(i, min(i + size, count)) for i in range(0, max(count, 1), size)]


def grouped_nms(boxes: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy IoU NMS within each group (image), for all groups in one call; indices kept,
    by decreasing score (ties in input order, which is each image's own order).

    The groups are kept apart by an offset per group, as torchvision's `batched_nms` does,
    but the offset here is a power of two and the coordinates sit on a 2^-16 grid in
    float64, so every sum is exact: a box's overlaps do not depend on its group's offset.
    Above NMS_MAX_BOXES boxes the groups are split into calls of at most that many (a
    group larger than that alone): torchvision's CUDA kernel keeps an n x n/64 bit mask,
    which over a whole batch of large images would not be bounded."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if len(boxes) <= NMS_MAX_BOXES:
        return _offset_nms(boxes, groups, iou)
    kept = []
    for members in _groupchunks(groups, NMS_MAX_BOXES):
        kept.append(members[_offset_nms(boxes[members], groups[members], iou)])
    everything = torch.cat(kept).sort().values  # input order, then a stable sort by score
    return everything[torch.argsort(boxes[everything, 4], descending=True, stable=True)]


def _offset_nms(boxes: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    coords = torch.round(boxes[:, :4].double() * _NMS_GRID) / _NMS_GRID
    # One read-back for both bounds (on a GPU each is a host synchronisation).
    reach, last_group = torch.stack([coords.abs().max(), groups.max().double()]).tolist()
    span = 2.0 ** math.ceil(math.log2(2 * reach + 2))
    if not math.isfinite(span) or span * (last_group + 2) >= _EXACT_LIMIT:
        raise ValueError(f"box coordinates out of range for NMS ({reach})")
    shifted = coords + (groups.double() * span)[:, None]
    return torchvision.ops.nms(shifted, boxes[:, 4].double(), iou)


def _groupchunks(groups: torch.Tensor, limit: int) -> list[torch.Tensor]:
    """Indices of the boxes of consecutive groups, packed into lists of at most `limit`
    boxes (a group with more is a list of its own)."""
    ids, counts = torch.unique(groups, return_counts=True)
    chunks: list[list[int]] = []
    total = limit
    for group, count in zip(ids.tolist(), counts.tolist(), strict=True):
        if total + count > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(group)
        total += count
    return [
        torch.isin(groups, torch.tensor(c, device=groups.device)).nonzero()[:, 0] for c in chunks
    ]


def min_nms(boxes: torch.Tensor, groups: torch.Tensor, threshold: float) -> torch.Tensor:
    """facenet-pytorch's last NMS ("Min": intersection over the smaller box, +1 pixel
    areas), greedy within each group: indices kept, by decreasing score. A box under
    ENCLOSED_AREA_RATIO of another's area does not suppress it (facenet-pytorch's does).

    Ties (ONet often scores several boxes of one face 1.0) go to the later box, as in
    facenet-pytorch, whose NumPy NMS takes the last of an ascending stable argsort.
    Up to NMS_BLOCK boxes it is one vectorised fixed point over all pairs; above, each
    group is resolved on its own, NMS_BLOCK boxes at a time against the boxes already
    kept, so memory stays O(NMS_BLOCK^2) whatever the batch (the same greedy result)."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.argsort(boxes[:, 4], stable=True).flip(0)
    b = boxes[order, :4].double()
    g = groups[order]
    if len(b) <= NMS_BLOCK:
        return order[
            _greedy_block(b, g, torch.ones(len(b), dtype=torch.bool, device=b.device), threshold)
        ]
    keep = torch.zeros(len(b), dtype=torch.bool, device=b.device)
    for group in torch.unique(g).tolist():
        members = (g == group).nonzero()[:, 0]  # ascending: decreasing score
        keep[members] = _blocked_min_nms(b[members], threshold)
    return order[keep]


def _blocked_min_nms(b: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy Min NMS of one group's boxes, already in score order: the keep mask."""
    keep = torch.zeros(len(b), dtype=torch.bool, device=b.device)
    none = torch.zeros(0, dtype=torch.int64, device=b.device)
    for start, stop in chunks(len(b), NMS_BLOCK):
        block = b[start:stop]
        alive = torch.ones(len(block), dtype=torch.bool, device=b.device)
        kept = keep[:start].nonzero()[:, 0] if start else none
        for i, j in chunks(len(kept), NMS_BLOCK) if len(kept) else []:
            alive &= ~_suppression(b[kept[i:j]], block, threshold).any(dim=0)
        same = torch.zeros(len(block), dtype=torch.int64, device=b.device)
        keep[start:stop] = _greedy_block(block, same, alive, threshold)
    return keep


def _suppression(a: torch.Tensor, b: torch.Tensor, threshold: float) -> torch.Tensor:
    """Whether box a (rows) may suppress box b (columns): intersection over the smaller box
    (+1 pixel areas) above `threshold`, and a not under ENCLOSED_AREA_RATIO of b's area."""
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    w = torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    h = torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])
    inter = (w + 1).clamp(min=0) * (h + 1).clamp(min=0)
    overlap = inter / torch.minimum(area_a[:, None], area_b[None, :])
    return (overlap > threshold) & (area_a[:, None] >= ENCLOSED_AREA_RATIO * area_b[None, :])


def _greedy_block(
    b: torch.Tensor, g: torch.Tensor, alive: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Greedy NMS among boxes in score order, of which only `alive` ones may be kept (and
    suppress): the keep mask."""
    earlier = torch.ones((len(b), len(b)), dtype=torch.bool, device=b.device).triu(diagonal=1)
    suppresses = _suppression(b, b, threshold) & earlier & (g[:, None] == g[None, :])
    # Greedy NMS is the fixed point of "kept unless a kept earlier box suppresses it"; from
    # all-kept the first k entries are final after k rounds, and it usually takes two.
    keep = alive.clone()
    while True:
        update = alive & ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(update, keep):
            return keep
        keep = update
