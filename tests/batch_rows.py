"""Input folders and manifest rows for batch's tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from batch.manifest import COPY_PIXELS, ManifestRun
from filter.decide import NoFacePolicy
from filter.thresholds import FilterInForce, Thresholds


def manifest_run(
    fingerprint: str,
    identity: float,
    copy_mode: str = COPY_PIXELS,
    no_face_policy: str = NoFacePolicy.REJECT.value,
) -> ManifestRun:
    judged_by = FilterInForce(fingerprint, Thresholds(identity, "override", None, None))
    return ManifestRun(judged_by, copy_mode, no_face_policy)


RUN = manifest_run("fingerprint1", 0.4)


def input_tree(root: Path, identities_dir: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.jpg").write_bytes((identities_dir / "id01" / "01.jpg").read_bytes())
    (root / "sub" / "deeper" / "b.JPG").write_bytes(b"not an image")
    (root / "sub" / "notes.txt").write_text("not listed")
    return root


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_row(
    path: str, verdict: str, copy_to: str, data: bytes | None, sha256: str = "0" * 64
) -> dict[str, object]:
    return {
        "path": path,
        "sha256": sha256,
        "verdict": verdict,
        "reason": None if verdict == "pass" else "identity_match",
        "faces": 1,
        "max_similarity": 0.2,
        "identity": None,
        "replica_similarity": None,
        "error": None,
        "images": 1,
        "part": None if verdict == "pass" else "image",
        "copy_to": copy_to,
        "copy": data,
        "source_size": 10,
        "source_mtime_ns": 1,
        "supersedes": None,
        **RUN.columns(),
    }
