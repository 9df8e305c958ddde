"""Server lifecycle: load models and index, serve gRPC with health and reflection,
export metrics, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from filter.detection_policy import uses_fast_path
from filter.embedders import resolve_device
from filter.errors import FilterError
from filter.overlap import batches_in_flight
from filter.thresholds import DEFAULT_IDENTITY_THRESHOLD
from service.audit import AuditFileError, AuditSink, JsonLinesAuditLog
from service.batcher import DynamicBatcher
from service.client_identity import ClientAllowlist
from service.config import Settings, unknown_env_warnings
from service.embedding import embedding_spec
from service.encoding import ContentSigner
from service.engine import CandidateEngine
from service.errors import StartupError
from service.generators import load_generator
from service.metrics import ServiceMetrics
from service.metrics_http import MetricsConfigError
from service.pipeline import GenerationPipeline
from service.proto.facegate.v1 import generation_pb2 as pb
from service.reload import (
    IndexReloader,
    LiveFilter,
    ReloadFacts,
    SwappableChecker,
    load_live_filter,
)
from service.reload_guard import start_live
from service.security import (
    check_audit_destination,
    metrics_endpoint,
    preflight,
    service_keys,
)
from service.servicer import Admission, GenerationServicer, add_to_server
from service.threshold_notices import startup_looser_warning
from service.tls import MAX_MESSAGE_BYTES as TLS_MAX_MESSAGE_BYTES
from service.tls import AllowlistInterceptor, server_credentials

if TYPE_CHECKING:
    from service.credentials import SigningCredentials

log = logging.getLogger("facegate.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
MAX_MESSAGE_BYTES = TLS_MAX_MESSAGE_BYTES  # clients (service.tls) accept as much


@dataclass
class LoadedService:
    pipeline: GenerationPipeline
    batcher: DynamicBatcher
    audit: AuditSink
    reloader: IndexReloader


def load_service(settings: Settings, metrics: ServiceMetrics) -> LoadedService:
    """Load models, index and generator (blocking; run off the event loop)."""
    # The pipeline `facegate check` and batch's actors build for the same settings, with a
    # lane per batch in flight on the CPU (filter.overlap).
    in_flight = batches_in_flight(settings.batches_in_flight, resolve_device(settings.device))
    embedding = embedding_spec(settings, lanes=in_flight).build()
    generator = load_generator(
        settings.generator,
        settings.models_dir,
        device=settings.device,
        path=settings.generator_path,
        latent_dim=settings.generator_latent_dim,
    )

    def load() -> LiveFilter:
        return load_live_filter(settings, embedding, generator.name, metrics)

    # Reloads compare with the index serving; the first load compares with the release last
    # published at the link (identity edits) and with the defaults (thresholds).
    live = start_live(settings.index_path, load)
    looser = startup_looser_warning(live.index, live.thresholds)
    if looser:
        log.warning("%s", looser)
    metrics.index_loaded(live.facts)
    index = live.index
    # Detection scope is the filter's policy: the full pyramid, as enrolment detects, unless
    # the operator chose the fast path (preflight warned).
    log.info(
        "detection for %s output: %s",
        generator.name,
        "generated-output fast path (operator's choice: large faces only)"
        if uses_fast_path(generator.name, settings.generated_fast_path)
        else "full pyramid (every face size)",
    )
    identity_filter = SwappableChecker(live.checker, live.in_force, live.index.salt)
    reloader = IndexReloader(load, identity_filter, live, ReloadFacts(metrics))
    metrics.build_info.info(
        {
            "version": _version(),
            "generator": generator.name,
            "generator_sha256": generator.model_sha256[:16],
            "embedder": embedding.embedder.name,
            "embedder_sha256": embedding.embedder.model_sha256[:16],
            "index_type": str(index.manifest.get("index_type", "")),
            "torch": torch.__version__,
        }
    )
    keys = service_keys(settings)
    engine = CandidateEngine(generator, identity_filter, observer=metrics, seed_key=keys.seed_key)
    # Lanes check batches side by side (CPU); batches sharing one overlap stage by stage.
    log.info("filter batches in flight: %d, in %d lanes", in_flight, embedding.lanes)
    batcher = DynamicBatcher(
        engine,
        max_batch=settings.max_batch,
        max_delay=settings.max_batch_delay_ms / 1000.0,
        in_flight=in_flight,
        spread=embedding.lanes > 1,
    )
    try:
        audit = JsonLinesAuditLog.open(
            settings.audit_log, on_drop=metrics.audit_dropped.inc, hash_identity=keys.hash_identity
        )
    except AuditFileError as exc:
        raise StartupError(str(exc)) from None
    pipeline = GenerationPipeline(
        batcher,
        generator.latent_dim,
        max_attempts=settings.max_attempts,
        max_count=settings.max_count,
        jpeg_quality=settings.jpeg_quality,
        observer=metrics,
        audit=audit,
        signer=content_signer_for(settings, generator.name, generator.model_sha256),
        max_result_bytes=MAX_MESSAGE_BYTES,
    )
    return LoadedService(pipeline=pipeline, batcher=batcher, audit=audit, reloader=reloader)


ServiceLoader = Callable[[Settings, ServiceMetrics], LoadedService]


def _version() -> str:
    try:
        return metadata.version("facegate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def signing_credentials_for(settings: Settings) -> SigningCredentials | None:
    """The C2PA signing credentials, loaded and test-signed; None when not configured.
    StartupError (naming the file) when unusable: never serve unsigned by accident."""
    from service.credentials import CredentialsError, SigningCredentials

    if settings.c2pa_cert is None or settings.c2pa_key is None:
        return None
    try:
        return SigningCredentials.load(settings.c2pa_cert, settings.c2pa_key)
    except CredentialsError as exc:
        raise StartupError(str(exc)) from None


def content_signer_for(
    settings: Settings, generator_name: str, generator_sha256: str
) -> ContentSigner | None:
    from service.credentials import C2paContentSigner

    credentials = signing_credentials_for(settings)
    if credentials is None:
        return None
    return C2paContentSigner(credentials, generator_name, generator_sha256)


def check_content_credentials(settings: Settings) -> None:
    """Before the models load: an unusable certificate or key stops startup in
    milliseconds, not after a minute of loading."""
    credentials = signing_credentials_for(settings)
    if credentials is None:
        log.info("FACEGATE_C2PA_CERT is not set: released images carry no content credentials")
        return
    log.info(
        "content credentials: every released image is signed (C2PA, ES256) as %s, issued by "
        "%s, valid until %s. Verifiers trust it only if its root is on their trust list; "
        "a test chain (make run's demo) reads as untrusted.",
        credentials.subject,
        credentials.issuer,
        credentials.not_after,
    )


def warn_unknown_env() -> None:
    """Before any startup check: a mistyped name explains the failure that may follow."""
    for warning in unknown_env_warnings():
        log.warning("%s", warning)


def log_effective_config(settings: Settings, metrics: ServiceMetrics) -> None:
    effective = settings.effective()
    log.info("effective configuration: %s", json.dumps(effective, sort_keys=True))
    metrics.config_info.info(settings.public_info())


class FacegateServer:
    """A running server; `start` returns once it listens, `wait_for_stop` drains."""

    def __init__(self, settings: Settings, loader: ServiceLoader = load_service) -> None:
        self.settings = settings
        # The loader is a seam: tests hold loading back to see the server while it loads.
        self.loader = loader
        self.metrics = ServiceMetrics(
            DEFAULT_IDENTITY_THRESHOLD if settings.threshold is None else settings.threshold
        )
        self.admission = Admission(
            settings.max_concurrent_requests,
            self.metrics,
            max_per_client=settings.max_concurrent_per_client,
            client_limits=settings.client_concurrency,
            max_per_peer=settings.max_concurrent_per_peer,
        )
        self.servicer = GenerationServicer(
            None, self.admission, self.metrics, max_request_seconds=settings.max_request_seconds
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.loaded: LoadedService | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[object]] = set()
        self._reload_pending = False

    async def start(self) -> None:
        warn_unknown_env()
        preflight(self.settings)
        log_effective_config(self.settings, self.metrics)
        check_content_credentials(self.settings)
        # After the configuration checks, before anything is served or loaded: no key, no
        # server (unless opted out); the audit log's key and file are settled.
        service_keys(self.settings)
        check_audit_destination(self.settings)
        if self.settings.metrics_enabled:
            self._serve_metrics()
        allowlist = ClientAllowlist(self.settings.tls_client_allowed)
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
            interceptors=[AllowlistInterceptor(allowlist)] if allowlist else None,
        )
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        credentials = server_credentials(
            self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca
        )
        try:
            if credentials is not None:
                self.grpc_port = server.add_secure_port(address, credentials)
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises where it used to return 0
            tls = " with FACEGATE_TLS_CERT/FACEGATE_TLS_KEY" if credentials is not None else ""
            raise StartupError(
                f"cannot bind gRPC address {address}{tls} ({exc}): is the port in use, "
                "or the certificate and key not a pair?"
            ) from None
        if self.grpc_port == 0:
            raise StartupError(f"cannot bind gRPC address {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ready.set(0)
        await server.start()
        self.server = server
        metrics_at = self.metrics.http_address
        log.info(
            "gRPC listening on %s (port %d), metrics %s; loading models",
            address,
            self.grpc_port,
            f"on {metrics_at[0]}:{metrics_at[1]} ({self.settings.metrics_auth})"
            if metrics_at
            else "off",
        )
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            self.loaded = await loop.run_in_executor(None, self.loader, self.settings, self.metrics)
        except Exception:
            await server.stop(0)
            self.metrics.stop_serving()
            raise
        self.servicer.pipeline = self.loaded.pipeline
        self.loaded.batcher.start()
        if self.settings.index_watch_seconds > 0:
            self._spawn(
                self.loaded.reloader.watch(
                    self.settings.index_path, self.settings.index_watch_seconds
                )
            )
        if self._reload_pending:
            self._spawn(self.loaded.reloader.reload("SIGHUP during startup"))
        self.admission.ready = True
        self.metrics.ready.set(1)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: SERVING after %.1f s", time.perf_counter() - started)

    def _serve_metrics(self) -> None:
        endpoint = metrics_endpoint(self.settings)
        refusal = endpoint.refusal()
        if refusal is not None:
            raise StartupError(refusal)
        for warning in endpoint.warnings():
            log.warning("%s", warning)
        try:
            self.metrics_port = self.metrics.serve(endpoint)
        except MetricsConfigError as exc:
            raise StartupError(str(exc)) from None

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: reload the index in the background; serving goes on meanwhile."""
        if self.admission.draining:
            log.warning("SIGHUP ignored: the server is draining")
        elif self.loaded is None:
            log.info("SIGHUP while loading: the index is reloaded once loading finishes")
            self._reload_pending = True
        else:
            self._spawn(self.loaded.reloader.reload("SIGHUP"))

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_for_stop(self) -> None:
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        log.info("draining: NOT_SERVING, grace period %.1f s", self.settings.grace_seconds)
        self.admission.draining = True
        self.metrics.ready.set(0)
        for task in list(self._background):
            task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.settings.grace_seconds)
        if self.loaded is not None:
            await self.loaded.batcher.close()
            self.loaded.audit.close()
        self.metrics.stop_serving()
        log.info("stopped")


async def run_server(settings: Settings) -> int:
    server = FacegateServer(settings)
    loop = asyncio.get_running_loop()
    # While models load there is nothing to drain, and a Python-level handler could wait
    # seconds for a native loader to release the GIL: SIGTERM/SIGINT keep their default
    # action (the kernel ends the process at once). Graceful drain once serving.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # SIGHUP (index reload) has a handler from the start: its default action would end
    # the process; a SIGHUP during loading is honoured once loading finishes.
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    await server.wait_for_stop()
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main_serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    try:
        return asyncio.run(run_server(settings))
    except (StartupError, FilterError) as exc:
        log.error("cannot start: %s", exc)
        return 2
