"""The index manifest's own facts: what `FaissIdentityIndex.build` records (embedder,
detector, replica feature, index type, counts, build time, salt, compute) and the checks
that refuse an index built for other models than those in use. File sizes and digests
are `filter.index_store`'s; the folder's layout is described in `filter.index`."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filter.errors import IndexCorruptError, IndexMismatchError
from filter.index_store import FORMAT_VERSION, MANIFEST_FILE, check_detector

# The manifest's `salt` (hex): a random value chosen when an index is built, anew by every
# edit of its membership (`index add`, `index remove`), and kept by everything else
# (`calibrate --save`, `index publish`). The service derives latents from (seed key, salt,
# seed, slot, attempt), so replaying a seed across a membership change meets new
# candidates everywhere: a before/after comparison tells nothing about who changed.
SALT_KEY = "salt"
SALT_BYTES = 16


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def salt_of(manifest: dict[str, Any]) -> bytes:
    """The manifest's salt as bytes (empty when absent); ValueError when malformed."""
    value = manifest.get(SALT_KEY)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ValueError("salt must be a hex string")
    try:
        salt = bytes.fromhex(value)
    except ValueError:
        raise ValueError("salt is not hexadecimal") from None
    if len(salt) < SALT_BYTES:
        raise ValueError(f"salt must hold at least {SALT_BYTES} bytes, it has {len(salt)}")
    return salt


def build_manifest(
    identities: Sequence[str],
    *,
    dim: int,
    embedder_name: str,
    model_sha256: str,
    detector: dict[str, object],
    replica: dict[str, object] | None,
    index_type: str,
    counts: dict[str, int] | None,
    salt: bytes | None,
    compute: dict[str, object] | None,
) -> dict[str, Any]:
    """The manifest of an index built now over these rows (one identity per face vector);
    `salt` None draws a new one. `save` adds the files' sizes and digests."""
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "embedder": {"name": embedder_name, "model_sha256": model_sha256, "dim": dim},
        "detector": detector,
        "replica": replica,
        "index_type": index_type,
        "similarity": "cosine (inner product of L2-normalised vectors)",
        "counts": {
            "identities": len(set(identities)),
            "vectors": len(identities),
            **(counts or {}),
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        SALT_KEY: (new_salt() if salt is None else salt).hex(),
    }
    if compute is not None:
        manifest["compute"] = compute
    return manifest


def _count(folder: Path, value: object, field: str, *, least: int) -> None:
    """A whole number the loader sizes arrays by: anything else is a corrupt manifest,
    said with its file, not a ValueError traceback."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise IndexCorruptError(
            f"{folder}/{MANIFEST_FILE}: {field} is {value!r}, not a whole number >= {least}"
        )


def check_manifest(
    folder: Path,
    manifest: dict[str, Any],
    *,
    expect_embedder: str | None,
    expect_model_sha256: str | None,
    expect_dim: int | None,
    expect_detector: dict[str, object] | None,
) -> None:
    """Refuse a manifest with a malformed salt, or one built for another embedder, model,
    dimension or detector than expected (a None expectation is not checked)."""
    try:
        salt_of(manifest)
    except ValueError as exc:
        raise IndexCorruptError(f"{folder}/{MANIFEST_FILE}: {exc}") from None
    embedder = manifest["embedder"]
    if not isinstance(embedder, dict):
        raise IndexCorruptError(f"{folder}/{MANIFEST_FILE}: embedder must be an object")
    _count(folder, embedder.get("dim"), "embedder.dim", least=1)
    replica = manifest.get("replica")
    if isinstance(replica, dict) and "components" in replica:
        _count(folder, replica["components"], "replica.components", least=0)
    if expect_embedder is not None and embedder.get("name") != expect_embedder:
        raise IndexMismatchError(
            f"index {folder} was built with embedder {embedder.get('name')!r} but the "
            f"embedder in use is {expect_embedder!r}; rebuild the index or change "
            "FACEGATE_EMBEDDER"
        )
    if expect_model_sha256 is not None and embedder.get("model_sha256") != expect_model_sha256:
        raise IndexMismatchError(
            f"index {folder} was built with {embedder.get('name')} model sha256 "
            f"{embedder.get('model_sha256')}, the loaded model is {expect_model_sha256}; "
            "rebuild the index with the current model"
        )
    if expect_dim is not None and embedder.get("dim") != expect_dim:
        raise IndexMismatchError(
            f"index {folder} holds {embedder.get('dim')}-d vectors, the embedder gives "
            f"{expect_dim}-d; rebuild the index"
        )
    if expect_detector is not None:
        check_detector(folder, manifest.get("detector"), expect_detector)
