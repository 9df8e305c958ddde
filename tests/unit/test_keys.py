"""Subkeys and keyed identity pseudonyms (filter/keys.py)."""

from __future__ import annotations

import hashlib

import pytest

from filter.keys import AUDIT_IDENTITY, derive_subkey, identity_digest

MASTER = bytes(range(32))


def test_subkeys_differ_by_purpose_and_from_the_master() -> None:
    audit = derive_subkey(MASTER, AUDIT_IDENTITY)
    other = derive_subkey(MASTER, "index-edit")
    assert len(audit) == 32
    assert audit != other
    assert audit != MASTER
    assert derive_subkey(MASTER, AUDIT_IDENTITY) == audit  # deterministic across processes
    assert derive_subkey(bytes(reversed(MASTER)), AUDIT_IDENTITY) != audit


def test_identity_digest_is_keyed_and_not_a_plain_hash() -> None:
    key = derive_subkey(MASTER, AUDIT_IDENTITY)
    digest = identity_digest(key, "alice")
    assert digest.startswith("hmac-sha256:")
    assert len(digest) == len("hmac-sha256:") + 32
    assert digest == identity_digest(key, "alice")
    assert digest != identity_digest(key, "bob")
    assert digest != identity_digest(derive_subkey(MASTER, "other"), "alice")
    # A guessed label cannot be tested without the key.
    assert hashlib.sha256(b"alice").hexdigest()[:32] not in digest


@pytest.mark.parametrize("master, purpose", [(b"", AUDIT_IDENTITY), (MASTER, "")])
def test_empty_inputs_are_refused(master: bytes, purpose: str) -> None:
    with pytest.raises(ValueError):
        derive_subkey(master, purpose)
