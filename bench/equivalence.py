"""Faces and verdicts on images of 640 px and less, before and after a detector change.

    .venv/bin/python -m bench.equivalence dump OUT.npz [--generated 1000]
    .venv/bin/python -m bench.equivalence compare OLD.npz NEW.npz
    .venv/bin/python -m bench.equivalence --baseline /work/main [--generated 1000]

`dump` records, with the checkout it runs in, every face (box, score, five landmarks) and
every verdict (pass, reason, max similarity) on two sets:
- the test photos (tests/data/faces, identities and multi; all under 640 px), on the full
  path, verdicts against an index of id01..id03 at 0.40 built by the same checkout;
- N faces of the default generator (seed 300), on the full path and on the fast path (an
  operator's opt-in, served by default until 2026-12-06), verdicts against the demo index
  (200 identities of seed 1, drawn without a salt so that every dump enrols the same
  faces) at 0.56, the demo's calibrated threshold.
`compare` says whether two dumps hold the same faces (count, boxes and landmarks within
1e-3 px, scores within 1e-5: two dumps of one machine) and the same verdicts; exit 1 if
not. `--baseline TREE`
dumps with TREE's own interpreter and code (its `.venv`, in a child process) and with
this checkout, then compares. The script uses only APIs both sides have (the detector's
`detect`, the filter's `check`).

`tests/data/detections-640.npz` is such a dump, made with the detector of index format
`mtcnn-batched` version 1 (the last one without native-resolution passes); the slow test
`tests/models/test_resolution.py::test_small_images_detect_as_before` compares against it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 64
BOX_TOLERANCE = 1e-3  # px
SCORE_TOLERANCE = 1e-5
# Against a dump made on another CPU: oneDNN picks its convolution kernels by instruction
# set, and the networks' float sums round differently. An AMX-capable Xeon moved boxes by
# up to 0.011 px and scores by 1.5e-5 against the reference made before it (2026-12-05),
# with every face count and verdict the same; these bounds are about 5x that.
CROSS_CPU_BOX_TOLERANCE = 0.05  # px
CROSS_CPU_SCORE_TOLERANCE = 1e-4


def _photos() -> list[Path]:
    faces = REPO / "tests" / "data" / "faces"
    return sorted(faces.glob("identities/*/*.jpg")) + sorted(faces.glob("multi/*.jpg"))


def dump(out: Path, generated: int) -> None:
    import torch

    torch.set_num_threads(2)
    from bench.common import MODELS, generated_faces
    from filter.decide import NoFacePolicy
    from filter.detection_policy import FastPathMode, filter_for_generator
    from filter.gallery import build_gallery_index
    from filter.identity_filter import IdentityFilter
    from filter.images import decode_image
    from service.demo import build_demo_index
    from service.generators import load_dcgan_digiface

    # The baseline's code may predate issue 22 (filter.runtime, and a filter that took a
    # float and added the default replica threshold itself): both sides must run this.
    try:
        from filter.assembly import build_embedding_pipeline, detector_manifest
        from filter.thresholds import pinned_thresholds
    except ImportError:
        from filter.runtime import build_embedding_pipeline, detector_manifest

        def pinned_thresholds(index: Any, identity: float) -> Any:
            return identity

    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
    arrays: dict[str, Any] = {}

    def record(name: str, filt: Any, images: list[np.ndarray]) -> None:
        detector = filt.embedding.aligner.detector
        counts, boxes, marks, passed, reasons, best = [], [], [], [], [], []
        for start in range(0, len(images), BATCH):
            chunk = images[start : start + BATCH]
            for faces in detector.detect(chunk):
                counts.append(len(faces))
                boxes += [[*f.box, f.score] for f in faces]
                marks += [f.landmarks for f in faces]
            for verdict in filt.check(chunk):
                passed.append(verdict.passed)
                reasons.append(str(verdict.reason) if verdict.reason is not None else "")
                best.append(np.nan if verdict.max_similarity is None else verdict.max_similarity)
        arrays[f"{name}_counts"] = np.array(counts, np.int64)
        arrays[f"{name}_boxes"] = np.array(boxes, np.float64).reshape(-1, 5)
        arrays[f"{name}_landmarks"] = np.array(marks, np.float64).reshape(-1, 5, 2)
        arrays[f"{name}_passed"] = np.array(passed, bool)
        arrays[f"{name}_reasons"] = np.array(reasons, dtype=str)
        arrays[f"{name}_max_similarity"] = np.array(best, np.float64)
        print(f"{name}: {len(images)} images, {sum(counts)} faces", file=sys.stderr)

    photos = [decode_image(p) for p in _photos()]
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Path(tmp) / "gallery"
        for identity in ("id01", "id02", "id03"):
            (gallery / identity).mkdir(parents=True)
            for photo in sorted((REPO / "tests/data/faces/identities" / identity).glob("*.jpg")):
                (gallery / identity / photo.name).symlink_to(photo)
        index, _ = build_gallery_index(
            gallery, pipeline, detector_settings=detector_manifest(pipeline)
        )
    photos_filter = IdentityFilter(
        pipeline, index, pinned_thresholds(index, 0.40), NoFacePolicy.REJECT
    )
    record("photos", photos_filter, photos)

    if generated:
        generator = load_dcgan_digiface(MODELS)
        # The unsalted draws (salt b""): a fresh random salt per build would enrol other
        # faces in each dump and move verdicts that have nothing to do with the detector.
        demo = build_demo_index(generator, pipeline, identities=200, seed=1, salt=b"")
        full = IdentityFilter(pipeline, demo, pinned_thresholds(demo, 0.56), NoFacePolicy.REJECT)
        images = generated_faces(generated, seed=300)
        record("generated_full", full, images)
        fast = filter_for_generator(full, generator.name, FastPathMode.ON)
        record("generated_fast", fast, images)
    np.savez_compressed(out, **arrays)


def compare(
    old_path: Path,
    new_path: Path,
    box_tolerance: float = BOX_TOLERANCE,
    score_tolerance: float = SCORE_TOLERANCE,
) -> dict[str, Any]:
    """Whether two dumps hold the same faces (within the tolerances) and the same
    verdicts; the defaults are for two dumps of one machine."""
    old, new = np.load(old_path), np.load(new_path)
    sets = sorted({k.rsplit("_", 1)[0] for k in old.files if k.endswith("_counts")})
    report: dict[str, Any] = {"bench": "equivalence", "same": True, "sets": {}}
    for name in sets:
        if f"{name}_counts" not in new.files:
            report["sets"][name] = {"missing": True}
            report["same"] = False
            continue
        a_counts, b_counts = old[f"{name}_counts"], new[f"{name}_counts"]
        same_counts = np.array_equal(a_counts, b_counts)
        row: dict[str, Any] = {
            "images": len(a_counts),
            "faces_old": int(a_counts.sum()),
            "faces_new": int(b_counts.sum()),
            "images_with_other_face_counts": int((a_counts != b_counts).sum())
            if len(a_counts) == len(b_counts)
            else None,
        }
        if same_counts:
            box = np.abs(old[f"{name}_boxes"][:, :4] - new[f"{name}_boxes"][:, :4])
            score = np.abs(old[f"{name}_boxes"][:, 4] - new[f"{name}_boxes"][:, 4])
            marks = np.abs(old[f"{name}_landmarks"] - new[f"{name}_landmarks"])
            row["box_max_abs_px"] = float(box.max()) if box.size else 0.0
            row["landmark_max_abs_px"] = float(marks.max()) if marks.size else 0.0
            row["score_max_abs"] = float(score.max()) if score.size else 0.0
            faces_same = (
                row["box_max_abs_px"] <= box_tolerance
                and row["landmark_max_abs_px"] <= box_tolerance
                and row["score_max_abs"] <= score_tolerance
            )
        else:
            faces_same = False
        verdicts_same = np.array_equal(old[f"{name}_passed"], new[f"{name}_passed"]) and (
            np.array_equal(old[f"{name}_reasons"], new[f"{name}_reasons"])
        )
        row["rejects_old"] = int((~old[f"{name}_passed"]).sum())
        row["rejects_new"] = int((~new[f"{name}_passed"]).sum())
        row["verdict_agreement"] = float(
            np.mean(
                (old[f"{name}_passed"] == new[f"{name}_passed"])
                & (old[f"{name}_reasons"] == new[f"{name}_reasons"])
            )
        )
        row["same_faces"] = bool(faces_same)
        row["same_verdicts"] = bool(verdicts_same)
        report["sets"][name] = row
        report["same"] = report["same"] and faces_same and verdicts_same
    return report


def main(argv: list[str]) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", choices=["dump", "compare"])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--generated", type=int, default=1000)
    parser.add_argument("--baseline", type=Path, help="another checkout (with its .venv)")
    args = parser.parse_args(argv)
    if args.action == "dump":
        dump(args.paths[0], args.generated)
        return 0
    if args.action == "compare":
        report = compare(args.paths[0], args.paths[1])
    else:
        if args.baseline is None:
            parser.error("give dump, compare or --baseline TREE")
        report = against(args.baseline, args.generated)
    print(json.dumps(report))
    return 0 if report["same"] else 1


def against(baseline: Path, generated: int) -> dict[str, Any]:
    """Dump with `baseline`'s own interpreter and code, then with this checkout's (each in
    a child process, this dump script and this checkout's models), and compare."""
    with tempfile.TemporaryDirectory() as tmp:
        outputs = []
        for tree in (baseline.resolve(), REPO):
            out = Path(tmp) / f"{len(outputs)}.npz"
            env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
            env["FACEGATE_MODELS_DIR"] = str(REPO / "models")
            subprocess.run(
                [
                    str(tree / ".venv" / "bin" / "python"),
                    str(Path(__file__).resolve()),
                    "dump",
                    str(out),
                    "--generated",
                    str(generated),
                ],
                cwd=tree,
                env=env,
                check=True,
            )
            outputs.append(out)
        report = compare(outputs[0], outputs[1])
    report["baseline"] = str(baseline)
    return report


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
