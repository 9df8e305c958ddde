"""A whole `facegate batch` run, driver side: list the inputs, drop those whose bytes the
manifest already has (batch.resume), run the rest on Ray, count."""

from __future__ import annotations

import re
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
from batch.targets import name_folding, refuse_recorded_places

PNG_SUFFIX = ".png"  # copies of checked pixels are PNGs


@dataclass(frozen=True)
class Plan:
    run: ManifestRun  # its thresholds `describe()` where each came from
    pending: list[InputItem]
    skipped: int  # their current manifest row holds the same bytes
    changed: int = 0  # had a row, but their bytes changed: checked again
    unavailable: int = 0  # had a row, but cannot be read now: row and copy kept


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
    # OUT may sit inside an input folder, or be named through a symlink or `..`: its own
    # copies are not inputs.
    suffix = PNG_SUFFIX if spec.copy_mode == COPY_PIXELS else None
    fold = name_folding(Path(out))  # how the file system holding the copies compares names
    items = discover_inputs(inputs, suffix, exclude=Path(out).resolve(), fold=fold)
    current = current_rows(out)
    refuse_recorded_places(items, current, out, fold)
    resumed = resume(items, current, out, resume_by)
    remove_unrecorded_copies(out)
    return Plan(run, resumed.pending, resumed.skipped, resumed.changed, resumed.unavailable)


def execute_plan(
    plan: Plan,
    out: Path,
    spec: FilterSpec,
    options: RayOptions,
    progress: Callable[[int], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the pending images on Ray (started or joined here) and summarise."""
    counts = dict.fromkeys(("processed", "passed", "rejected", "not_copied"), 0)
    if plan.pending:
        import ray.exceptions

        from batch.engine import ray_session, run_batch

        try:
            with ray_session(options.address):
                counts = run_batch(plan.pending, out, spec, plan.run, options, progress)
        except ray.exceptions.RayError as exc:
            # Fail closed: what was recorded stays, with its copies; nothing else is.
            cause = failure_cause(exc)
            raise BatchError(
                f"the batch stopped ({cause}); batches already recorded are kept: rerun the "
                "same command to resume"
            ) from exc
    return {
        "processed": counts["processed"],
        "skipped": plan.skipped,
        "changed": plan.changed,
        "unavailable": plan.unavailable,
        "passed": counts["passed"],
        "rejected": counts["rejected"],
        "not_copied": counts["not_copied"],
        "manifest": str(manifest_dir(out)),
        "pass": str(Path(out) / PASS_DIR),
        "index_fingerprint": plan.run.index_fingerprint,
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CHAINED = re.compile(
    r"\n\s*(?:The above exception was the direct cause of the following exception"
    r"|During handling of the above exception, another exception occurred):\s*\n"
)


def failure_cause(exc: BaseException) -> str:
    """The exception that stopped a Ray run, as `Type: message`. Ray hands the driver a
    wrapper (Ray Data's "UDF failed ... retry" hint, whose last line says nothing of the
    cause); the original exception is the first of the traceback text's chain, since it
    comes across as text only."""
    inner: BaseException = exc
    seen = {id(inner)}
    while True:
        nxt = getattr(inner, "cause", None) or inner.__cause__
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            break
        inner, seen = nxt, seen | {id(nxt)}
    import ray.exceptions

    if not isinstance(inner, ray.exceptions.RayError):
        return f"{type(inner).__name__}: {inner}"
    text = _ANSI.sub("", str(exc)).strip()
    first = _CHAINED.split(text)[0]
    lines = first.splitlines()
    # The exception's own lines follow the last frame ("  File ...", then its indented
    # code and caret lines).
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    start = frames[-1] + 1 if frames else 0
    while start < len(lines) and lines[start][:1].isspace():
        start += 1
    message = " ".join(line.strip() for line in lines[start:] if line.strip())
    return message or (lines[-1].strip() if lines else type(exc).__name__)
