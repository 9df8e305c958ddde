"""A whole `facegate batch` run, driver side: list the inputs, drop those whose bytes the
manifest already has (batch.resume), run the rest on Ray, count."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch.checking import FilterSpec
from batch.engine import RayOptions
from batch.errors import BatchError
from batch.inputs import InputItem, discover_inputs
from batch.manifest import (
    COPY_PIXELS,
    PASS_DIR,
    ManifestRun,
    check_out_folder,
    check_run_identity,
    current_rows,
    manifest_dir,
    remove_partial_fragments,
    remove_unrecorded_copies,
)
from batch.resume import RESUME_CONTENT, resume

PNG_SUFFIX = ".png"  # copies of checked pixels are PNGs


@dataclass(frozen=True)
class Plan:
    run: ManifestRun  # its thresholds `describe()` where each came from
    pending: list[InputItem]
    skipped: int  # their current manifest row holds the same bytes
    changed: int = 0  # had a row, but their bytes changed: checked again


def plan_batch(
    inputs: Sequence[str], out: Path, spec: FilterSpec, resume_by: str = RESUME_CONTENT
) -> Plan:
    """What a run over `inputs` into `out` has left to do (batch.resume)."""
    check_out_folder(out)
    run = spec.run()
    remove_partial_fragments(out)
    check_run_identity(out, run)
    # Marks OUT as a batch's before any copy is written: a run that stops before its
    # first fragment leaves an OUT its rerun accepts (and cleans).
    manifest_dir(out).mkdir(parents=True, exist_ok=True)
    # OUT may sit inside an input folder: its own copies are not inputs.
    own = Path(out).absolute()
    suffix = PNG_SUFFIX if spec.copy_mode == COPY_PIXELS else None
    items = [i for i in discover_inputs(inputs, suffix) if not Path(i.source).is_relative_to(own)]
    resumed = resume(items, current_rows(out), out, resume_by)
    remove_unrecorded_copies(out)
    return Plan(run, resumed.pending, resumed.skipped, resumed.changed)


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
            raise BatchError(
                f"the batch stopped ({cause}); batches already recorded are kept: rerun the "
                "same command to resume"
            ) from exc
    return {
        "processed": counts["processed"],
        "skipped": plan.skipped,
        "changed": plan.changed,
        "passed": counts["passed"],
        "rejected": counts["rejected"],
        "manifest": str(manifest_dir(out)),
        "pass": str(Path(out) / PASS_DIR),
        "index_fingerprint": plan.run.index_fingerprint,
    }
