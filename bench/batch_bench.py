"""Batch mode against `facegate check` on the same files (`make bench-batch`).

Writes BATCH_BENCH_IMAGES generator samples (64x64 PNG, seed 3) and a demo index (40
identities, seed 1) to a temporary folder, then times, as a user runs them:
  - `facegate check` on all the files (one process);
  - `facegate batch` with 1 and with 2 model actors on a local Ray started in-process.
Each line: wall time (model loading and, for batch, Ray's start included), images/s, the
marginal rate (each command is also run on the first third of the images: the rate of
the other two thirds, without the start), and peak memory (the sum of the RSS of the
command's process tree, Ray's processes included, sampled every 0.2 s from /proc). The
verdict counts of batch and check are compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import MODELS, REPO, emit, generated_faces

IMAGES = int(os.environ.get("BATCH_BENCH_IMAGES", "300"))


def tree_rss(root_pid: int) -> int:
    """Bytes resident in `root_pid` and all its descendants (Linux /proc; Ray's raylet,
    GCS and workers are descendants of the process that started Ray)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError, ValueError):
            for text in Path(f"/proc/{pid}/status").read_text().splitlines():
                if text.startswith("VmRSS:"):
                    total += int(text.split()[1]) * 1024
    return total


def run_measured(args: list[str]) -> Measured:
    """Run `python -m service.cli ARGS`: wall seconds, peak tree RSS and stdout."""
    env = {**os.environ, "FACEGATE_MODELS_DIR": str(MODELS)}
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile("w+") as stdout:
        child = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
        peak = 0
        while child.poll() is None:
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            raise SystemExit(f"facegate {' '.join(args[:2])} failed with {child.returncode}")
        stdout.seek(0)
        return Measured(seconds, peak, stdout.read())


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss: int
    stdout: str


def prepare(root: Path) -> tuple[Path, list[Path]]:
    from PIL import Image

    from filter.assembly import build_embedding_pipeline
    from service.demo import build_demo_index
    from service.generators import load_dcgan_digiface

    index = root / "index"
    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
    build_demo_index(load_dcgan_digiface(MODELS), pipeline, identities=40, seed=1).save(index)
    folder = root / "generated"
    folder.mkdir()
    paths = []
    for i, face in enumerate(generated_faces(IMAGES, seed=3)):
        path = folder / f"{i:05d}.png"
        Image.fromarray(face).save(path)
        paths.append(path)
    return index, paths


def line(name: str, small: Measured, full: Measured, counts: dict[str, Any]) -> dict[str, Any]:
    extra = full.seconds - small.seconds
    return {
        "run": name,
        "images": IMAGES,
        "seconds": round(full.seconds, 1),
        "images_per_s": round(IMAGES / full.seconds, 2),
        # The same command on the first third of the images: the difference is the cost
        # of the other two thirds, without the start (models, Ray, actors).
        "seconds_first_third": round(small.seconds, 1),
        "marginal_images_per_s": round((IMAGES - IMAGES // 3) / extra, 2) if extra > 0 else None,
        "peak_rss_mib": round(full.peak_rss / 2**20),
        **counts,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index, paths = prepare(root)
        third = root / "third"
        third.mkdir()
        for path in paths[: IMAGES // 3]:
            (third / path.name).symlink_to(path)

        def check(files: list[Path]) -> Measured:
            return run_measured(["check", "--index", str(index), *map(str, files)])

        small, full = check(paths[: IMAGES // 3]), check(paths)
        verdicts = [json.loads(text)["verdict"] for text in full.stdout.splitlines()]
        check_counts = {"passed": verdicts.count("pass"), "rejected": verdicts.count("reject")}
        emit(line("check", small, full, check_counts))
        for actors in (1, 2):

            def batch(folder: Path, out: Path, actors: int = actors) -> Measured:
                args = ["batch", "--index", str(index), "--out", str(out), "--actors"]
                return run_measured([*args, str(actors), str(folder)])

            small = batch(third, root / f"small-{actors}")
            full = batch(root / "generated", root / f"out-{actors}")
            summary = json.loads(full.stdout.strip().splitlines()[-1])
            counts = {k: summary[k] for k in ("passed", "rejected")}
            emit(
                {
                    **line(f"batch --actors {actors}", small, full, counts),
                    "same_counts_as_check": counts == check_counts,
                }
            )


if __name__ == "__main__":
    main()
