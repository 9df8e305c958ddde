"""The Ray Data layer: where Ray runs, and the datasets that run the plain steps of
`batch.reading`, `batch.checking` and `batch.recording` (and `batch.gallery`) as CPU
tasks and model actors."""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa

import batch
from batch.errors import BatchError
from batch.manifest import COPY_ORIGINAL, MANIFEST_SCHEMA, ManifestRun
from batch.reading import load_rows
from batch.recording import NOT_COPIED, record_rows

if TYPE_CHECKING:  # not imported at run time: every Ray worker imports this module
    from batch.checking import FilterSpec
    from batch.inputs import InputItem
    from filter.assembly import EmbeddingSpec

# Logical CPUs a local Ray declares at least: read and write tasks can then always be
# scheduled beside the actors, even on a 2-core machine (see docs/batch.md).
MIN_LOCAL_CPUS = 4
LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started in-process
    actors: int = 1
    batch_size: int = 32
    num_gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs, else 0
    # Blocks each actor checks at once (FACEGATE_BATCHES_IN_FLIGHT): two overlap stage by
    # stage (filter.overlap); 0: 2 for an actor with a GPU, 1 without.
    in_flight: int = 0


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray in this process; shut
    down what was started here. A Ray already initialised (a test session, a notebook) is
    used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        start_local_ray()
    try:
        yield
    finally:
        ray.shutdown()


def start_local_ray(num_cpus: int | None = None) -> None:
    """A private local Ray: no dashboard, a small object store, at least MIN_LOCAL_CPUS
    logical CPUs, and workers that import this very facegate (not another installation's).

    Token authentication stays on, with a random token for this process passed through
    the environment (unless the operator set RAY_AUTH_MODE or RAY_AUTH_TOKEN): nothing is
    written to ~/.ray/auth_token, and no other local user can submit work to it."""
    import ray

    if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray reads its auth mode once, at import; this is how Ray itself re-reads it
    # (ray._private.authentication.authentication_token_setup._enable_token_auth).
    from ray._raylet import Config  # type: ignore[attr-defined]

    Config.initialize("")
    code_root = str(Path(batch.__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": python_path}},
    )


def quiet_data_context() -> None:
    """Ray Data's own progress bars and per-run logs would bury ours and the summary."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def worker_spec(spec: EmbeddingSpec) -> EmbeddingSpec:
    """The spec for model actors: unless set (FACEGATE_TORCH_THREADS), the torch thread
    count of this process, the one `facegate check` and a single-process index build use
    here, so that actors compute bitwise what they would (Ray itself would give each
    worker one thread)."""
    if spec.torch_threads:
        return spec
    import torch

    return replace(spec, torch_threads=torch.get_num_threads())


def actor_gpus(options: RayOptions) -> float:
    import ray

    available = float(ray.cluster_resources().get("GPU", 0))
    if options.num_gpus is None:
        return 1.0 if available > 0 else 0.0
    if options.num_gpus > available:
        # Ray would wait for them for ever: say so instead.
        raise BatchError(
            f"--num-gpus {options.num_gpus} per actor, but the Ray cluster has {available:g} GPUs"
        )
    return options.num_gpus


def actor_calls(options: RayOptions, gpus: float) -> int:
    """Calls each model actor runs at once: the option, or 2 on a GPU and 1 on CPUs (where
    the stages already use every core the actor has)."""
    return options.in_flight or (2 if gpus > 0 else 1)


def _rows(table: pa.Table) -> list[Any]:
    """A block's rows, as the step's row type says (`batch.rows`): the schemas between
    the steps keep them so."""
    return table.to_pylist()


# Explicit schemas between the steps: a block whose optional columns are all null must
# still have the types of the others.
LOADED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("copy_to", pa.string()),
        ("row", pa.int64()),
        ("column", pa.string()),
        ("supersedes", pa.string()),
        ("sha256", pa.string()),
        ("source_size", pa.int64()),
        ("source_mtime_ns", pa.int64()),
        ("view_names", pa.list_(pa.string())),
        ("view_pixels", pa.list_(pa.binary())),
        ("view_heights", pa.list_(pa.int32())),
        ("view_widths", pa.list_(pa.int32())),
        ("frames", pa.int32()),
        ("unaccounted", pa.list_(pa.string())),
        ("copy", pa.binary()),
        ("error", pa.string()),
    ]
)
_RECORDED_ONLY = {"pass_copy", "pass_sha256", "recorded_at"}  # set by the record step
CHECKED_SCHEMA = pa.schema(
    [
        *(field for field in MANIFEST_SCHEMA if field.name not in _RECORDED_ONLY),
        pa.field("copy_to", pa.string()),
        pa.field("copy", pa.binary()),
    ]
)


def _load(table: pa.Table, copy_original: bool) -> pa.Table:
    rows = load_rows(_rows(table), copy_original=copy_original)
    return pa.Table.from_pylist(rows, schema=LOADED_SCHEMA)


class _CheckActor:
    """One per actor: builds the filter once, then checks batch after batch."""

    def __init__(self, spec: FilterSpec, expected: ManifestRun) -> None:
        from batch.checking import BatchChecker

        self.checker = BatchChecker(spec, expected)

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.checker.check(_rows(table)), schema=CHECKED_SCHEMA)


def _record(table: pa.Table, out: str) -> pa.Table:
    recorded = record_rows(Path(out), _rows(table))
    return pa.Table.from_pylist(
        [{"verdict": row["verdict"], "reason": row["reason"]} for row in recorded],
        schema=pa.schema([("verdict", pa.string()), ("reason", pa.string())]),
    )


def count_recorded(verdicts: list[str], reasons: list[str | None]) -> dict[str, int]:
    """A recorded block's counts. A pass whose copy could not be written (`not_copied`) is
    a reject row in the manifest, but neither a pass nor a filter rejection: counted on
    its own, so an operator sees that a rerun has work to do."""
    not_copied = reasons.count(NOT_COPIED)
    return {
        "processed": len(verdicts),
        "passed": verdicts.count("pass"),
        "rejected": verdicts.count("reject") - not_copied,
        "not_copied": not_copied,
    }


def run_batch(
    items: list[InputItem],
    out: Path,
    spec: FilterSpec,
    expected: ManifestRun,
    options: RayOptions,
    progress: Callable[[int], None],
) -> dict[str, int]:
    """Check every item on Ray: decode on CPU tasks, filter in an actor pool, record on
    CPU tasks, one manifest fragment per block of `batch_size` images. Returns counts."""
    import ray.data

    quiet_data_context()
    gpus = actor_gpus(options)
    calls = actor_calls(options, gpus)
    blocks = max(1, math.ceil(len(items) / options.batch_size))
    dataset = (
        ray.data.from_items([item.as_row() for item in items], override_num_blocks=blocks)
        # Half a CPU each: its own resources keep Ray Data from fusing decoding into the
        # model actor (decoding stays on CPU tasks, beside the actors).
        .map_batches(
            partial(_load, copy_original=spec.copy_mode == COPY_ORIGINAL),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.5,
        )
        .map_batches(
            _CheckActor,
            fn_constructor_args=(replace(spec, embedding=worker_spec(spec.embedding)), expected),
            batch_format="pyarrow",
            batch_size=options.batch_size,
            compute=ray.data.ActorPoolStrategy(
                size=options.actors,
                max_concurrent_calls_per_actor=calls,
                enable_true_multi_threading=calls > 1,
            ),
            num_gpus=gpus,
        )
        # One fragment per batch: a crash loses at most the batches in flight.
        .map_batches(
            partial(_record, out=str(out)), batch_format="pyarrow", batch_size=options.batch_size
        )
    )
    counts = dict.fromkeys(("processed", "passed", "rejected", "not_copied"), 0)
    for result in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        block = cast(Any, result)
        recorded = count_recorded(
            block.column("verdict").to_pylist(), block.column("reason").to_pylist()
        )
        for name, value in recorded.items():
            counts[name] += value
        progress(recorded["processed"])
    return counts
