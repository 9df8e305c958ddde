"""Content credentials (C2PA) on released images, and reading them back.

With FACEGATE_C2PA_CERT and FACEGATE_C2PA_KEY set, every released image carries a signed
C2PA manifest saying that it is AI-generated (a `c2pa.created` action whose
digitalSourceType is IPTC's trainedAlgorithmicMedia, by the generator named with its model
hash) and that it passed facegate's identity filter (the `org.facegate.filter` assertion:
index fingerprint, thresholds in force and where they came from, request id).

The manifest obeys the API's oracle rules: thresholds and fingerprints only, never a score,
a distance or an identity, and no key named after one (so the identity threshold is
`face_match_threshold`).
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import c2pa
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from PIL import Image

from service.errors import SigningFailure
from service.provenance import ReleaseFacts

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
FILTER_ASSERTION = "org.facegate.filter"
FILTER_ASSERTION_VERSION = 1
# Key names that would make the manifest look like (or become) a membership oracle.
FORBIDDEN_KEY_PARTS = ("similarity", "distance", "score", "identity")
# The SDK adds a JPEG thumbnail of the image by default: ~10x the size of a 64x64 PNG,
# and nothing a verifier needs, since the image itself is what the manifest binds.
_SDK_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}


class CredentialsError(Exception):
    """The signing certificate or key is unusable; the message names the file."""


@dataclass(frozen=True)
class SigningCredentials:
    """A certificate chain and its ES256 key, parsed and proven to sign (see `load`)."""

    chain_pem: bytes
    key_pem: bytes  # PKCS#8, as the SDK wants it
    cert_path: Path
    key_path: Path
    subject: str
    issuer: str
    not_after: str

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> SigningCredentials:
        """Read, parse and test-sign once: an unusable file fails here, at startup, with a
        message naming it, rather than on the first request."""
        cert_name = f"FACEGATE_C2PA_CERT {cert_path}"
        key_name = f"FACEGATE_C2PA_KEY {key_path}"
        chain_pem = _read(cert_path, cert_name)
        key_bytes = _read(key_path, key_name)
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError:
            raise CredentialsError(f"{cert_name} is not a PEM certificate chain") from None
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError) as exc:
            raise CredentialsError(
                f"{key_name} is not an unencrypted PEM private key ({exc})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise CredentialsError(f"{key_name}: ES256 signing needs an EC P-256 key")
        leaf = chain[0]
        if leaf.public_key() != key.public_key():
            raise CredentialsError(
                f"{key_name} does not belong to the first certificate of {cert_name}"
            )
        credentials = cls(
            chain_pem=chain_pem,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_path=cert_path,
            key_path=key_path,
            subject=leaf.subject.rfc4514_string(),
            issuer=leaf.issuer.rfc4514_string(),
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
        credentials._test_sign(cert_name, key_name)
        return credentials

    def _test_sign(self, cert_name: str, key_name: str) -> None:
        """Sign a tiny image with the real manifest shape and read it back valid."""
        signer = C2paContentSigner(self, generator_name="startup-check", generator_sha256="0")
        probe = _probe_png()
        try:
            signed = signer.sign_manifest(probe, "image/png", signer.manifest(None))
            report = read_credentials(signed, "image/png")
        except (c2pa.C2paError, SigningFailure) as exc:
            raise CredentialsError(
                f"{cert_name} with {key_name} cannot sign content credentials "
                f"(a C2PA signing certificate needs the digitalSignature key usage and an "
                f"extended key usage such as emailProtection; it must not be a CA): {exc}"
            ) from None
        if not report.get("signature_valid"):
            raise CredentialsError(
                f"{cert_name}: a test signature does not validate: {report.get('failures')}"
            )


def _read(path: Path, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{name} cannot be read: {exc.strerror or exc}") from None


def _probe_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _facegate_version() -> str:
    try:
        return metadata.version("facegate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class C2paContentSigner:
    """Signs released images (service.encoding.ContentSigner). Built once per server, with
    the generator it serves; blocking, so called off the event loop."""

    def __init__(
        self, credentials: SigningCredentials, generator_name: str, generator_sha256: str
    ) -> None:
        self.credentials = credentials
        self.generator_name = generator_name
        self.generator_sha256 = generator_sha256
        self._context = c2pa.Context(settings=c2pa.Settings.from_dict(_SDK_SETTINGS))
        self._signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(
                c2pa.C2paSigningAlg.ES256, credentials.chain_pem, credentials.key_pem, None
            )
        )
        # One native signer and context are shared; signing takes a few ms, so images
        # are signed one at a time rather than relying on the SDK's thread safety.
        self._lock = threading.Lock()

    def manifest(self, facts: ReleaseFacts | None) -> dict[str, Any]:
        created: dict[str, Any] = {
            "action": "c2pa.created",
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": {"name": self.generator_name},
        }
        assertion: dict[str, Any] = {
            "version": FILTER_ASSERTION_VERSION,
            "filter_passed": True,
            "generator": self.generator_name,
            "generator_model_sha256": self.generator_sha256,
        }
        if facts is not None:
            thresholds = facts.filtered_by.thresholds
            assertion |= {
                "index_fingerprint": facts.filtered_by.index_fingerprint,
                "face_match_threshold": thresholds.identity,
                "face_match_threshold_source": thresholds.identity_source,
                "replica_threshold": thresholds.replica,  # None: the index has no replicas
                "replica_threshold_source": thresholds.replica_source,
                "request_id": facts.request_id,
            }
        return {
            "claim_generator_info": [{"name": "facegate", "version": _facegate_version()}],
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [created]}},
                {"label": FILTER_ASSERTION, "data": assertion},
            ],
        }

    def sign(self, data: bytes, media_type: str, facts: ReleaseFacts) -> bytes:
        try:
            return self.sign_manifest(data, media_type, self.manifest(facts))
        except c2pa.C2paError as exc:
            raise SigningFailure(f"C2PA signing failed: {exc}") from exc

    def sign_manifest(self, data: bytes, media_type: str, manifest: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        with self._lock:
            builder = c2pa.Builder.from_json(manifest, self._context)
            builder.sign(self._signer, media_type, io.BytesIO(data), out)
        return out.getvalue()


def sniff_media_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


def read_credentials(
    data: bytes, media_type: str, trust_anchors: bytes | None = None
) -> dict[str, Any]:
    """What an image's content credentials say: manifest present, signature valid, trust
    (`trusted` needs `trust_anchors`, PEM roots; a test root reads `untrusted`), the
    AI-generated action, the generator and the facegate assertion. Raises c2pa.C2paError
    on bytes the SDK cannot parse."""
    settings: dict[str, Any] = dict(_SDK_SETTINGS)
    if trust_anchors is not None:
        settings |= {
            "trust": {"trust_anchors": trust_anchors.decode()},
            "verify": {"verify_trust": True},
        }
    context = c2pa.Context(settings=c2pa.Settings.from_dict(settings))
    reader = c2pa.Reader.try_create(media_type, io.BytesIO(data), context=context)
    if reader is None:
        return {
            "manifest": False,
            "validation_state": None,
            "signature_valid": False,
            "trust": "none",
            "failures": [],
            "signer": None,
            "ai_generated": False,
            "digital_source_type": None,
            "software_agent": None,
            "facegate": None,
        }
    with reader:
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
        active = reader.get_active_manifest() or {}
    failures = sorted(
        {item["code"] for item in (results.get("activeManifest") or {}).get("failure", [])}
    )
    if state == "Trusted":
        trust = "trusted"
    elif "signingCredential.untrusted" in failures:
        trust = "untrusted"
    else:
        trust = "unknown"
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get(
        "actions", []
    )
    created = next((a for a in actions if a.get("action") == "c2pa.created"), None)
    return {
        "manifest": True,
        "validation_state": state,
        "signature_valid": state in ("Valid", "Trusted"),
        "trust": trust,
        "failures": failures,
        "signer": (active.get("signature_info") or {}).get("common_name"),
        "ai_generated": bool(
            created and created.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA
        ),
        "digital_source_type": created.get("digitalSourceType") if created else None,
        "software_agent": created.get("softwareAgent") if created else None,
        "facegate": assertions.get(FILTER_ASSERTION),
    }


def manifest_json_of(data: bytes, media_type: str) -> dict[str, Any]:
    """The whole manifest store as the SDK reports it (for audits and tests)."""
    with c2pa.Reader(media_type, io.BytesIO(data)) as reader:
        parsed: dict[str, Any] = json.loads(reader.json())
    return parsed
