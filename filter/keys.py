"""Subkeys of the operator's secret, one per purpose, and keyed hashes of identity labels.

One secret (FACEGATE_SEED_KEY_FILE) keys several things: the latents, the audit log's
identity pseudonyms, the records an index edit keeps of who was removed. Using the same
key bytes for all of them would let a value from one context be replayed in another, so
each purpose gets its own subkey, derived with domain separation (HKDF-Expand style:
HMAC-SHA256 of the master key over a fixed label and the purpose). The latents keep
their own domain string (`service.generators`), which predates this module.

A keyed hash of a label is a pseudonym: whoever holds the key can map a label they already
know to its hash (`facegate audit hash LABEL`) and find it in a log, but nobody can test a
guessed name without the key, which a plain SHA-256 would allow.
"""

from __future__ import annotations

import hashlib
import hmac

_SUBKEY_LABEL = b"facegate subkey v1\x00"

# Purposes: fixed names, so the same master key gives the same subkey in every process.
AUDIT_IDENTITY = "audit-identity"

IDENTITY_HASH_PREFIX = "hmac-sha256:"
IDENTITY_HASH_HEX_CHARS = 32  # 128 bits: collision-free for any gallery, short in a log line


def derive_subkey(master: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose, independent of every other purpose's."""
    if not master:
        raise ValueError("cannot derive a subkey from an empty key")
    if not purpose:
        raise ValueError("a subkey needs a purpose")
    return hmac.new(master, _SUBKEY_LABEL + purpose.encode("utf-8"), hashlib.sha256).digest()


def identity_digest(subkey: bytes, label: str) -> str:
    """The keyed pseudonym of an identity label, as logs and index records write it."""
    mac = hmac.new(subkey, label.encode("utf-8"), hashlib.sha256).hexdigest()
    return IDENTITY_HASH_PREFIX + mac[:IDENTITY_HASH_HEX_CHARS]
