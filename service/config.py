"""Service settings from the environment (prefix FACEGATE_), built once in main()."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from filter.decide import NoFacePolicy
from filter.fast_path_mode import FastPathMode
from filter.models import default_models_dir
from service.client_identity import AllowlistError, ClientAllowlist

ENV_PREFIX = "FACEGATE_"

# Names that the test suite and tooling read but the service does not.
NON_SETTING_ENV = frozenset({"FACEGATE_TEST_FACES"})
# Upper bounds on durations: far above any sane value, low enough that a typo (ms for s, an
# exponent too many) is refused instead of stalling batches or a shutdown for ever.
MAX_BATCH_DELAY_MS = 1000.0
MAX_GRACE_SECONDS = 3600.0
MAX_WAIT_SECONDS = 86400.0
# Polling faster than this re-stats the index in a busy loop.
MIN_INDEX_WATCH_SECONDS = 0.1
# What a JSON-valued setting must hold, for the message when it does not parse.
JSON_FORMS = {
    "client_concurrency": 'a JSON object of subject -> limit, e.g. {"CN=batch": 2}',
    "tls_client_allowed": 'a JSON list of subjects or SANs, e.g. ["CN=batch,O=acme"]',
}


class ConfigError(Exception):
    """The configuration is invalid; the message names the variable."""


class Settings(BaseSettings):
    # inf and nan are refused everywhere: no setting means "for ever" or "undefined".
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, allow_inf_nan=False
    )

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9095, ge=0, le=65535, description="0 picks a free port")
    metrics_enabled: bool = True
    # Metrics are for the monitoring system only (issue 20): loopback unless the operator
    # opens them, optionally behind TLS with client certificates and/or a bearer token.
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="address of /metrics; 0.0.0.0 for a Prometheus on the network",
    )
    metrics_tls_cert: Path | None = Field(None, description="serve /metrics over TLS")
    metrics_tls_key: Path | None = Field(None, description="secret: the metrics cert's key")
    metrics_tls_client_ca: Path | None = Field(
        None, description="CA bundle: scrapers must present a certificate it issued"
    )
    metrics_bearer_token_file: Path | None = Field(
        None, description="secret: scrapers must send `Authorization: Bearer <token>`"
    )
    metrics_allow_unauthenticated: bool = Field(
        False,
        description="serve /metrics beyond loopback with neither a bearer token nor client "
        "certificates (refused otherwise)",
    )
    index_path: Path = Path("var/index")
    threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="identity threshold; overrides the saved calibration"
    )
    replica_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="replica threshold; overrides the saved calibration"
    )
    shadow_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="identity threshold evaluated on traffic, not acted on"
    )
    shadow_replica_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="replica threshold evaluated on traffic, not acted on"
    )
    index_watch_seconds: float = Field(
        0.0,
        ge=0.0,
        le=MAX_WAIT_SECONDS,
        description=f"poll the index path and reload on change (>= {MIN_INDEX_WATCH_SECONDS} "
        "s); 0: SIGHUP only",
    )
    max_attempts: int = Field(8, ge=1, le=1000)
    no_face_policy: NoFacePolicy = NoFacePolicy.REJECT
    generator: Literal["dcgan-digiface", "torchscript"] = "dcgan-digiface"
    generator_path: Path | None = None
    generator_latent_dim: int = Field(100, ge=1, description="torchscript generators only")
    embedder: Literal["sface", "facenet"] = "sface"
    detector: Literal["mtcnn-batched", "mtcnn"] = Field(
        "mtcnn-batched", description="mtcnn: facenet-pytorch's MTCNN, for indexes it built"
    )
    facenet_weights: Path | None = None
    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="default: the installation's models/, else ~/.local/share/facegate/models",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_count: int = Field(64, ge=1, le=4096)
    max_concurrent_requests: int = Field(16, ge=1)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_seconds: float = Field(20.0, ge=0.0, le=MAX_GRACE_SECONDS)
    audit_log: str = Field("stderr", description="'stderr', 'none', or a file path")
    max_batch: int = Field(64, ge=1, description="candidates per filter batch")
    max_batch_delay_ms: float = Field(
        5.0, ge=0.0, le=MAX_BATCH_DELAY_MS, description="wait to fill a batch"
    )
    batches_in_flight: int = Field(
        0,
        ge=0,
        le=8,
        description=(
            "the server's filter batches in flight: on a GPU overlapped stage by stage, on "
            "the CPU each in a lane of its own (networks and embedder loaded per lane, the "
            "cores shared out); 0: 2 (1 on a one-core CPU). facegate batch: blocks per "
            "actor, sharing its stages; 0: 2 on a GPU, 1 on the CPU"
        ),
    )
    generated_fast_path: FastPathMode = Field(
        FastPathMode.AUTO,
        description="auto: only for a verified generator (none: the full pyramid); on; off",
    )
    torch_threads: int = Field(0, ge=0, description="0 keeps torch's default")
    jpeg_quality: int = Field(90, ge=1, le=100)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Hardening (issue 9).
    seed_key_file: Path | None = Field(
        None, description="secret: raw bytes (>= 32) keying seed -> latent; required"
    )
    allow_unkeyed_seeds: bool = Field(
        False,
        description="serve without a seed key: latents become a public function of the seed "
        "and the index salt (demos only)",
    )
    max_request_seconds: float = Field(
        60.0, gt=0.0, le=MAX_WAIT_SECONDS, description="every call ends by then (DEADLINE_EXCEEDED)"
    )
    tls_client_ca: Path | None = Field(
        None, description="CA bundle; makes client certificates required and verified"
    )
    tls_ca: Path | None = Field(
        None,
        description="CA of the server certificate, for the health check and the CLI client "
        "(default FACEGATE_TLS_CERT itself: right for a self-signed certificate)",
    )
    tls_server_name: str = Field(
        "localhost", description="name in the server certificate, for the health check"
    )
    tls_client_allowed: list[str] = Field(
        default_factory=list,
        description="JSON list of the client subjects or SANs allowed under mutual TLS, e.g. "
        '["CN=batch,O=acme", "DNS:probe.facegate", "URI:spiffe://acme/batch"]',
    )
    tls_client_cert: Path | None = Field(
        None,
        description="the client certificate the health check and `facegate generate` present "
        "under mutual TLS (never the server's own)",
    )
    tls_client_key: Path | None = Field(None, description="secret: that client certificate's key")
    max_concurrent_per_client: int = Field(
        0, ge=0, description="per client-certificate subject; 0 = only the global limit"
    )
    max_concurrent_per_peer: int = Field(
        0,
        ge=0,
        description="per peer address when a call has no client certificate; 0 = off "
        "(behind a load balancer every call shares its address)",
    )
    # 0 would lift the client's cap and a negative limit block it: a limit is positive.
    client_concurrency: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict,
        description='JSON, client-certificate subject -> its own limit, e.g. {"CN=batch": 2}',
    )
    audit_key_file: Path | None = Field(
        None,
        description="secret (>= 32 bytes) keying the audit log's identity hashes; default: "
        "a subkey of the seed key",
    )
    audit_clear_identities: bool = Field(
        False, description="write identities to the audit log in clear text (opt-in)"
    )
    audit_hash_identities: bool | None = Field(
        None, description="deprecated: identities are hashed by default"
    )
    # Content credentials (issue 12).
    c2pa_cert: Path | None = Field(
        None, description="PEM chain (signing certificate first): sign every released image"
    )
    c2pa_key: Path | None = Field(None, description="secret: the signing certificate's key")

    @field_validator("index_watch_seconds")
    @classmethod
    def _watch_interval(cls, value: float) -> float:
        if 0 < value < MIN_INDEX_WATCH_SECONDS:
            raise ValueError(f"must be 0 (no watch) or at least {MIN_INDEX_WATCH_SECONDS} seconds")
        return value

    @field_validator("generated_fast_path", mode="before")
    @classmethod
    def _fast_path_booleans(cls, value: object) -> object:
        # Earlier releases took a boolean meant for the embedded generator; "true" maps to
        # auto, which no longer gives the fast path to any generator (README "Small faces and
        # the fast path"): the safe direction, and never wider than before.
        aliases = dict.fromkeys(("true", "1", "yes"), "auto") | dict.fromkeys(
            ("false", "0", "no"), "off"
        )
        if isinstance(value, bool):
            return "auto" if value else "off"
        if isinstance(value, str):
            return aliases.get(value.strip().lower(), value.strip().lower())
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.generator == "torchscript" and self.generator_path is None:
            raise ValueError(
                "FACEGATE_GENERATOR_PATH is required when FACEGATE_GENERATOR=torchscript"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("FACEGATE_TLS_CERT and FACEGATE_TLS_KEY must be set together")
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ValueError("FACEGATE_C2PA_CERT and FACEGATE_C2PA_KEY must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("FACEGATE_TLS_CLIENT_CA needs FACEGATE_TLS_CERT and FACEGATE_TLS_KEY")
        if self.embedder == "facenet" and self.facenet_weights is None:
            raise ValueError("FACEGATE_FACENET_WEIGHTS is required when FACEGATE_EMBEDDER=facenet")
        self._check_security_combinations()
        return self

    def _check_security_combinations(self) -> None:
        if self.tls_client_allowed and self.tls_client_ca is None:
            raise ValueError(
                "FACEGATE_TLS_CLIENT_ALLOWED needs FACEGATE_TLS_CLIENT_CA (mutual TLS): without "
                "client certificates there is no subject to allow"
            )
        try:
            ClientAllowlist(self.tls_client_allowed)
        except AllowlistError as exc:
            raise ValueError(f"FACEGATE_TLS_CLIENT_ALLOWED: {exc}") from None
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError(
                "FACEGATE_TLS_CLIENT_CERT and FACEGATE_TLS_CLIENT_KEY must be set together"
            )
        if (self.metrics_tls_cert is None) != (self.metrics_tls_key is None):
            raise ValueError(
                "FACEGATE_METRICS_TLS_CERT and FACEGATE_METRICS_TLS_KEY must be set together"
            )
        if self.metrics_tls_client_ca is not None and self.metrics_tls_cert is None:
            raise ValueError(
                "FACEGATE_METRICS_TLS_CLIENT_CA needs FACEGATE_METRICS_TLS_CERT and "
                "FACEGATE_METRICS_TLS_KEY"
            )
        if self.audit_hash_identities is False:
            raise ValueError(
                "FACEGATE_AUDIT_HASH_IDENTITIES=false no longer writes identities in clear "
                "text: they are hashed by default; opt in with FACEGATE_AUDIT_CLEAR_IDENTITIES="
                "true, and remove FACEGATE_AUDIT_HASH_IDENTITIES"
            )
        if self.audit_clear_identities and self.audit_key_file is not None:
            raise ValueError(
                "FACEGATE_AUDIT_CLEAR_IDENTITIES=true writes no hash: unset "
                "FACEGATE_AUDIT_KEY_FILE, or the clear-text opt-in"
            )

    @property
    def metrics_auth(self) -> str:
        """How scrapers are authenticated: none, tls (server only), mtls, bearer, or both."""
        parts = []
        if self.metrics_tls_cert is not None:
            parts.append("mtls" if self.metrics_tls_client_ca is not None else "tls")
        if self.metrics_bearer_token_file is not None:
            parts.append("bearer")
        return "+".join(parts) or "none"

    @property
    def audit_identities(self) -> str:
        """What the audit log writes for an identity: hashed, clear, or off (no audit log)."""
        if self.audit_log == "none":
            return "off"
        return "clear" if self.audit_clear_identities else "hashed"

    def effective(self) -> dict[str, str]:
        """The values in use, as strings, for the startup log and the info metric."""
        return {name: str(getattr(self, name)) for name in type(self).model_fields}

    def public_info(self) -> dict[str, str]:
        """The effective config for the info metric: no file paths (a path can name the
        deployment's layout or a secret's mount); a path setting reads `set` or `unset`."""
        info: dict[str, str] = {}
        path_like = ("_path", "_file", "_dir", "_weights", "_cert", "_key", "_ca")
        for name, value in self.effective().items():
            raw = getattr(self, name)
            if isinstance(raw, Path) or name.endswith(path_like):
                info[name] = "unset" if raw is None else "set"
            elif name == "audit_log" and raw not in ("stderr", "none"):
                info[name] = "file"
            elif name == "client_concurrency":
                info[name] = f"{len(raw)} subjects"
            elif name == "tls_client_allowed":
                info[name] = f"{len(raw)} entries"
            elif name in ("tls_cert", "tls_key", "tls_client_ca", "tls_ca"):
                info[name] = "unset" if raw is None else "set"
            else:
                info[name] = value
        info["seeds"] = "keyed" if self.seed_key_file is not None else "unkeyed"
        info["content_credentials"] = "c2pa" if self.c2pa_cert is not None else "off"
        info["metrics_auth"] = self.metrics_auth
        info["audit_identities"] = self.audit_identities
        return info


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; raise ConfigError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError as exc:
        raise ConfigError(_unparsed_message(exc)) from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(p) for p in error["loc"]]
            name = f"{ENV_PREFIX}{loc[0].upper()}" if loc else "configuration"
            # A dict or list entry: its key, as written (subjects are case-sensitive).
            entry = "".join(f"[{p}]" for p in loc[1:])
            value = error.get("input")
            shown = f" (got {value!r})" if loc and not isinstance(value, dict) else ""
            problems.append(f"{name}{entry}: {error['msg']}{shown}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _unparsed_message(exc: SettingsError) -> str:
    """pydantic-settings could not decode a complex (JSON) setting: name it and its form."""
    match = re.search(r'field "(\w+)"', str(exc))
    field = match.group(1) if match else ""
    name = f"{ENV_PREFIX}{field.upper()}" if field else "a FACEGATE_* variable"
    form = JSON_FORMS.get(field, "JSON")
    return f"invalid configuration: {name} is not valid JSON: it must be {form}"


def unknown_env_warnings(environ: dict[str, str] | None = None) -> list[str]:
    """One warning per unknown FACEGATE_* name, with the setting it most resembles."""
    known = sorted(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)
    warnings = []
    for name in unknown_env_names(environ):
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else " (typo?)"
        warnings.append(f"environment variable {name} matches no setting and is ignored{hint}")
    return warnings


def unknown_env_names(environ: dict[str, str] | None = None) -> list[str]:
    """FACEGATE_* variables that match no setting: pydantic-settings ignores them silently."""
    environ = dict(os.environ) if environ is None else environ
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    return sorted(
        key
        for key in environ
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known | NON_SETTING_ENV
    )
