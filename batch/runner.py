"""A whole `facegate batch` run, driver side: list the inputs, drop those the manifest
already has (before any image is read), run the rest on Ray, count."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch.checking import FilterSpec
from batch.engine import RayOptions
from batch.inputs import InputItem, discover_inputs
from batch.manifest import (
    PASS_DIR,
    RunIdentity,
    manifest_dir,
    recorded_paths,
    remove_partial_fragments,
    remove_unrecorded_copies,
)
from filter.errors import FilterError


@dataclass(frozen=True)
class Plan:
    run: RunIdentity
    thresholds: str  # the thresholds in force and where each came from
    pending: list[InputItem]
    skipped: int  # already in the manifest


def plan_batch(inputs: Sequence[str], out: Path, spec: FilterSpec) -> Plan:
    """What a run over `inputs` into `out` has left to do."""
    run, thresholds = spec.run_identity()
    remove_partial_fragments(out)
    recorded = recorded_paths(out, run)
    remove_unrecorded_copies(out)
    # OUT may sit inside an input folder: its own copies are not inputs.
    own = Path(out).absolute()
    items = [i for i in discover_inputs(inputs) if not Path(i.source).is_relative_to(own)]
    pending = [item for item in items if item.key not in recorded]
    return Plan(run, thresholds, pending, len(items) - len(pending))


def execute_plan(
    plan: Plan,
    out: Path,
    spec: FilterSpec,
    options: RayOptions,
    progress: Callable[[int], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the pending images on Ray (started or joined here) and summarise."""
    counts = {"processed": 0, "passed": 0, "rejected": 0}
    if plan.pending:
        import ray.exceptions

        from batch.engine import ray_session, run_batch

        try:
            with ray_session(options.address):
                counts = run_batch(plan.pending, out, spec, plan.run, options, progress)
        except ray.exceptions.RayError as exc:
            # Fail closed: what was recorded stays, with its copies; nothing else is.
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise FilterError(
                f"the batch stopped ({cause}); batches already recorded are kept: rerun the "
                "same command to resume"
            ) from exc
    return {
        "processed": counts["processed"],
        "skipped": plan.skipped,
        "passed": counts["passed"],
        "rejected": counts["rejected"],
        "manifest": str(manifest_dir(out)),
        "pass": str(Path(out) / PASS_DIR),
        "index_fingerprint": plan.run.index_fingerprint,
    }
