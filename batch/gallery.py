"""`facegate index build --ray`: the gallery embedded on Ray, enrolled on the driver.

The gallery is cut into the same chunks a single-process build embeds (one model call
each), decoded on CPU tasks and embedded in model actors; the driver then enrols the
chunks in gallery order through the same `Enrolment`, so the index, its manifest and
its enrolment rules (a broken embedding is refused) are those of a single-process build.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pyarrow as pa

from batch.engine import RayOptions, actor_gpus, quiet_data_context, worker_spec
from filter.assembly import EmbeddingSpec
from filter.gallery import (
    EmbeddedChunk,
    Enrolment,
    decode_chunk,
    embed_chunk,
)
from filter.gallery_files import gallery_chunks, list_gallery
from filter.images import ImageLimits

# One model call per chunk, as filter.gallery.build_gallery_index makes them.
GALLERY_CHUNK = 16

# Chunks travel between our own tasks and actors as pickles of filter.gallery's dataclasses
# (same code on both ends: Ray runs this facegate's modules everywhere).


def _decode(table: pa.Table, gallery: str) -> pa.Table:
    rows = table.to_pylist()
    out = []
    for row in rows:
        chunk = [
            (identity, Path(path))
            for identity, path in zip(row["identities"], row["paths"], strict=True)
        ]
        decoded = decode_chunk(Path(gallery), chunk, ImageLimits())
        out.append({"chunk": row["chunk"], "payload": pickle.dumps(decoded)})
    return pa.Table.from_pylist(out)


class _EmbedActor:
    def __init__(self, spec: EmbeddingSpec) -> None:
        self.pipeline = spec.build()

    def __call__(self, table: pa.Table) -> pa.Table:
        out = []
        for row in table.to_pylist():
            embedded = embed_chunk(pickle.loads(row["payload"]), self.pipeline)
            out.append({"chunk": row["chunk"], "payload": pickle.dumps(embedded)})
        return pa.Table.from_pylist(out)


def enrol_gallery_on_ray(
    gallery: Path,
    spec: EmbeddingSpec,
    enrolment: Enrolment,
    options: RayOptions,
    progress: Callable[[int], None] = lambda _: None,
) -> Enrolment:
    """Embed every chunk of GALLERY on Ray (Ray must be running) and add them to
    `enrolment` in gallery order, whatever order Ray finishes them in."""
    from functools import partial

    import ray.data

    quiet_data_context()
    gallery = Path(gallery).absolute()
    listing = list_gallery(gallery)
    enrolment.expect_gallery(listing)
    chunks = gallery_chunks(listing, GALLERY_CHUNK)
    sizes = [len(chunk) for chunk in chunks]
    rows = [
        {"chunk": i, "identities": [c[0] for c in chunk], "paths": [str(c[1]) for c in chunk]}
        for i, chunk in enumerate(chunks)
    ]
    per_block = max(1, options.batch_size // GALLERY_CHUNK)
    dataset = (
        ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_block)))
        # Half a CPU: its own resources keep Ray Data from fusing decoding into the actor.
        .map_batches(
            partial(_decode, gallery=str(gallery)),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.5,
        )
        .map_batches(
            _EmbedActor,
            fn_constructor_args=(worker_spec(spec),),
            batch_format="pyarrow",
            batch_size=per_block,
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            num_gpus=actor_gpus(options),
        )
    )
    done: dict[int, EmbeddedChunk] = {}
    for result in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in cast(Any, result).to_pylist():
            done[int(row["chunk"])] = pickle.loads(row["payload"])
            progress(sizes[int(row["chunk"])])
    if sorted(done) != list(range(len(chunks))):
        missing = sorted(set(range(len(chunks))) - set(done))
        raise RuntimeError(f"Ray returned no result for gallery chunks {missing}")
    for i in range(len(chunks)):
        enrolment.add_chunk(done.pop(i))
    return enrolment
