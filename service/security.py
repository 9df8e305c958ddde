"""Secure by default: the startup decisions about keys and who may see what.

A server started with nothing but an index is keyed (it refuses to start without
FACEGATE_SEED_KEY_FILE), its metrics listen on loopback only, and its audit log names no
one (identities are keyed pseudonyms). Each weaker choice is an explicit setting, logged
at startup as a warning and shown in `facegate_config_info`; each refusal says what to
set. Everything here is cheap, so it runs before the models load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filter.decide import NoFacePolicy
from filter.fast_path_mode import FAST_PATH_VERIFIED_GENERATORS, FastPathMode
from service.audit import AuditFileError, identity_hasher, open_owner_only
from service.config import Settings
from service.errors import StartupError
from service.generators import MIN_SEED_KEY_BYTES, load_seed_key
from service.metrics_http import MetricsEndpoint

log = logging.getLogger("facegate.server")


def preflight(settings: Settings) -> None:
    """Cheap checks that give a clear message before anything heavy starts."""
    index = Path(settings.index_path)
    if not (index / "manifest.json").is_file():
        raise StartupError(
            f"no identity index at {index} (FACEGATE_INDEX_PATH). A privacy filter without its "
            "index protects no one: build one with `facegate index build GALLERY --out "
            f"{index}` (or `make demo-index` for the demo)"
        )
    for variable, path in (
        ("FACEGATE_TLS_CERT", settings.tls_cert),
        ("FACEGATE_TLS_KEY", settings.tls_key),
        ("FACEGATE_TLS_CLIENT_CA", settings.tls_client_ca),
    ):
        if path is not None and not Path(path).is_file():
            raise StartupError(f"{variable} {path} does not exist")
    for warning in transport_warnings(settings) + policy_warnings(settings):
        log.warning("%s", warning)


def check_audit_destination(settings: Settings) -> None:
    """Open (and create) an audit file once before the models load, so that a symlink, a
    second hard link or a missing permission stops startup at once, naming the file."""
    if settings.audit_log in ("stderr", "none"):
        return
    try:
        open_owner_only(Path(settings.audit_log)).close()
    except AuditFileError as exc:
        raise StartupError(str(exc)) from None


@dataclass(frozen=True)
class ServiceKeys:
    """The secrets the service runs with, read once at startup."""

    seed_key: bytes | None  # None only with FACEGATE_ALLOW_UNKEYED_SEEDS=true
    hash_identity: Callable[[str], str] | None  # None: the audit log is off or clear text


def seed_key_or_refuse(settings: Settings) -> bytes | None:
    """The seed key; without one, a refusal unless the operator opted into unkeyed seeds."""
    try:
        key = load_seed_key(settings.seed_key_file)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if key is not None:
        return key
    if not settings.allow_unkeyed_seeds:
        raise StartupError(
            "no seed key: FACEGATE_SEED_KEY_FILE is not set. Without it a latent is a public "
            "function of the seed, so any caller who sees `attempts > 1` can regenerate the "
            "held-back candidates (the training faces the filter caught) from the public "
            f"weights. Create one ({MIN_SEED_KEY_BYTES}+ random bytes, e.g. `head -c 32 "
            "/dev/urandom > seed.key; chmod 600 seed.key`) and set FACEGATE_SEED_KEY_FILE, the "
            "same key on every replica and for `facegate index demo`; or, for a demo only, "
            "set FACEGATE_ALLOW_UNKEYED_SEEDS=true"
        )
    log.warning(
        "FACEGATE_ALLOW_UNKEYED_SEEDS=true: serving without a seed key. Latents are a public "
        "function of the seed and the index salt: whoever learns the salt (it is in the "
        "index manifest) can regenerate held-back candidates offline. Demos only."
    )
    return None


def audit_master_key(settings: Settings, seed_key: bytes | None) -> bytes | None:
    """The key the audit log's identity pseudonyms derive from: FACEGATE_AUDIT_KEY_FILE,
    else the seed key; None when neither is there."""
    if settings.audit_key_file is None:
        return seed_key
    path = Path(settings.audit_key_file)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StartupError(
            f"FACEGATE_AUDIT_KEY_FILE {path} cannot be read: {exc.strerror}"
        ) from None
    if len(key) < MIN_SEED_KEY_BYTES:
        raise StartupError(
            f"FACEGATE_AUDIT_KEY_FILE {path} holds {len(key)} bytes; at least "
            f"{MIN_SEED_KEY_BYTES} are needed"
        )
    return key


def audit_identity_hasher(
    settings: Settings, seed_key: bytes | None
) -> Callable[[str], str] | None:
    """How the audit log writes an identity: a keyed pseudonym, or clear text when the
    operator opted in; a refusal when there is no key to hash with."""
    if settings.audit_log == "none":
        return None
    if settings.audit_clear_identities:
        log.warning(
            "FACEGATE_AUDIT_CLEAR_IDENTITIES=true: the audit log (%s) names training "
            "identities in clear text; whoever reads it learns who is in the training set",
            settings.audit_log,
        )
        return None
    master = audit_master_key(settings, seed_key)
    if master is None:
        raise StartupError(
            "the audit log hashes identities under a key derived from FACEGATE_SEED_KEY_FILE, "
            "which is not set (FACEGATE_ALLOW_UNKEYED_SEEDS=true): set FACEGATE_AUDIT_KEY_FILE "
            "to a key of its own, or FACEGATE_AUDIT_CLEAR_IDENTITIES=true to write identities "
            "in clear text, or FACEGATE_AUDIT_LOG=none"
        )
    if settings.audit_hash_identities:
        log.warning(
            "FACEGATE_AUDIT_HASH_IDENTITIES is no longer needed (identities are hashed by "
            "default); remove it"
        )
    return identity_hasher(master)


def service_keys(settings: Settings) -> ServiceKeys:
    """The seed key and the audit log's identity hashing; StartupError (saying what to set)
    without a seed key unless unkeyed seeds are opted into, or with an unusable key file."""
    seed_key = seed_key_or_refuse(settings)
    return ServiceKeys(seed_key, audit_identity_hasher(settings, seed_key))


def metrics_endpoint(settings: Settings) -> MetricsEndpoint:
    return MetricsEndpoint(
        host=settings.metrics_host,
        port=settings.metrics_port,
        tls_cert=settings.metrics_tls_cert,
        tls_key=settings.metrics_tls_key,
        tls_client_ca=settings.metrics_tls_client_ca,
        bearer_token_file=settings.metrics_bearer_token_file,
        allow_unauthenticated=settings.metrics_allow_unauthenticated,
    )


def transport_warnings(settings: Settings) -> list[str]:
    """Who may call, when the operator left it wide."""
    if settings.tls_cert is None:
        warnings = ["FACEGATE_TLS_CERT is not set: gRPC is plaintext and callers are anonymous"]
        if not settings.max_concurrent_per_peer:
            warnings.append(
                "FACEGATE_MAX_CONCURRENT_PER_PEER is 0: one anonymous caller may hold all "
                f"{settings.max_concurrent_requests} slots (behind a load balancer every call "
                "shares its address; limit there instead)"
            )
        return warnings
    if settings.tls_client_ca is None:
        return ["FACEGATE_TLS_CLIENT_CA is not set: any client may call (no mutual TLS)"]
    if not settings.tls_client_allowed:
        return [
            "FACEGATE_TLS_CLIENT_ALLOWED is not set: every certificate FACEGATE_TLS_CLIENT_CA "
            "issued may call, server certificates included; name your clients' subjects or SANs"
        ]
    return []


def policy_warnings(settings: Settings) -> list[str]:
    """Filter policies the operator set weaker than the defaults."""
    warnings = []
    if settings.no_face_policy is NoFacePolicy.PASS:
        warnings.append(
            "FACEGATE_NO_FACE_POLICY=pass: images in which no face is detected are released "
            "with only the whole-image replica check, a training face the detector missed "
            "included"
        )
    fast = settings.generated_fast_path
    if fast is FastPathMode.ON and settings.generator not in FAST_PATH_VERIFIED_GENERATORS:
        warnings.append(
            f"FACEGATE_GENERATED_FAST_PATH=on for generator {settings.generator}: the fast "
            "path looks only for faces of at least half the frame, so a smaller face "
            "beside a larger one is released unchecked, and it keeps other boxes and "
            "landmarks than the full pyramid the index was enrolled with, so even an "
            "enrolled image can fall below the threshold against its own enrolment "
            "(measured on the embedded generator: README, 'Small faces and the fast path')"
        )
    return warnings
