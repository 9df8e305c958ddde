"""Prometheus metrics. One registry per server instance (no module globals), served
on its own HTTP port. Histograms are in seconds and aggregate across replicas;
labels take values from small fixed sets only, each defined beside what it labels
(filter.decide, filter.stages, service.live_index). A leaf: it imports value types only,
and the service's observers (pipeline, shadow, reload) hand it values."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from filter.decide import CANDIDATE_OUTCOMES, SHADOW_CHANGES, ImageVerdict, verdict_outcome
from filter.stages import GENERATE, STAGES
from service.live_index import RELOAD_FAILURE, RELOAD_RESULTS, LiveIndexFacts
from service.metrics_http import MetricsEndpoint, MetricsHttpServer

GRPC_CODES = (
    "OK",
    "CANCELLED",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "INTERNAL",
    "UNAVAILABLE",
    "UNKNOWN",
)
METHODS = ("Generate", "GenerateStream")
SIGNALS = ("identity", "replica")
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


SIMILARITY_STEP = 0.1


def similarity_buckets(threshold: float) -> tuple[float, ...]:
    """Upper edges of the similarity buckets, deliberately coarse: up to three 0.1-wide
    bins below the threshold (and one edge at 0 when they start above 0.1), the threshold
    itself, then +Inf: everything above the threshold is one bucket.

    Whoever reads /metrics on a quiet replica can tie a bucket increment to one request's
    face. Fine buckets would make the histogram the membership oracle the API refuses to
    be (how close a held-back face came to a training identity, to 0.01). These bins show
    what an SRE needs (drift of the distribution, the share of faces just under the
    threshold, the rejection share) and no more than 0.1 about any one face; above the
    threshold they say nothing beyond "rejected", which the caller already knows.

    Every threshold the configuration accepts, [-1, 1], gives at least the threshold's own
    edge (cosine similarities are never below -1).
    """
    below = [round(threshold - SIMILARITY_STEP * k, 4) for k in (3, 2, 1)]
    edges = [edge for edge in below if edge > -1.0]
    if edges and edges[0] >= SIMILARITY_STEP:
        edges.insert(0, 0.0)
    return (*edges, round(threshold, 4))


def bucket_of(value: float, edges: tuple[float, ...]) -> int:
    """Index of the bucket a value lands in: the first whose upper edge is at or above it
    (Prometheus' `le`); len(edges) is the +Inf bucket."""
    return next((i for i, edge in enumerate(edges) if value <= edge), len(edges))


def quantize_similarity(value: float, edges: tuple[float, ...]) -> float:
    """The lower edge of the value's bucket (-1 for the first), which is all the
    histogram's _sum adds: it carries no more than its buckets do."""
    index = bucket_of(value, edges)
    return -1.0 if index == 0 else edges[index - 1]


class SimilarityHistogram:
    """`facegate_similarity`: counts per bucket (cumulative on export, as Prometheus reads
    them) and a _sum of bucket lower edges. A collector of its own, because a plain
    Histogram's _sum adds the values observed, and observing a quantized value would put it
    in the bucket below."""

    name = "facegate_similarity"
    documentation = (
        "Each checked face's maximum cosine similarity to the training identities, coarse by "
        "design (0.1 bins below the threshold, one above it; _sum of bucket lower edges)"
    )

    def __init__(self, threshold: float) -> None:
        self._lock = threading.Lock()
        self.edges: tuple[float, ...] = ()
        self.align(threshold)

    def align(self, threshold: float) -> None:
        """Cut the buckets at this threshold. When that moves an edge the counts restart
        from zero (counts of other bins cannot be carried over); otherwise they are kept."""
        edges = similarity_buckets(threshold)
        with self._lock:
            if edges == self.edges:
                return
            self.edges = edges
            self._counts = [0] * (len(edges) + 1)
            self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bucket_of(value, self.edges)] += 1
            self._sum += quantize_similarity(value, self.edges)

    def collect(self) -> Iterator[Metric]:
        # Samples written out: prometheus_client's HistogramMetricFamily drops _count and
        # _sum when an edge is negative (thresholds below 0.3 give such edges).
        family = self._family()
        with self._lock:
            total = 0
            for edge, count in zip((*self.edges, math.inf), self._counts, strict=True):
                total += count
                family.add_sample(f"{self.name}_bucket", {"le": floatToGoString(edge)}, total)
            family.add_sample(f"{self.name}_count", {}, total)
            family.add_sample(f"{self.name}_sum", {}, round(self._sum, 4))
        yield family

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        return Metric(self.name, self.documentation, "histogram")


class ServiceMetrics:
    def __init__(self, threshold: float, registry: CollectorRegistry | None = None) -> None:
        self._http_server: MetricsHttpServer | None = None
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.candidates = Counter(
            "facegate_candidates", "Generated candidates by filter outcome", ["outcome"], registry=r
        )
        for outcome in CANDIDATE_OUTCOMES:
            self.candidates.labels(outcome)
        self.requests = Counter(
            "facegate_requests",
            "Finished RPCs by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        for method in METHODS:
            for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE"):
                self.requests.labels(method, code)
        self.request_seconds = Histogram(
            "facegate_request_seconds",
            "RPC latency",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.similarity = SimilarityHistogram(threshold)
        r.register(self.similarity)
        self.filter_seconds = Histogram(
            "facegate_filter_seconds",
            "Identity filter time per batch by stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.filter_seconds.labels(stage)
        self.generate_seconds = Histogram(
            "facegate_generate_seconds",
            "Generator time per batch",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generate_seconds.labels(GENERATE)
        self.batch_size = Histogram(
            "facegate_batch_candidates",
            "Candidates per filter batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.attempts = Histogram(
            "facegate_attempts",
            "Candidates drawn per released image",
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 16, 32),
            registry=r,
        )
        self.unfilled_slots = Counter(
            "facegate_unfilled", "Slots left unfilled after the attempt budget", registry=r
        )
        self.index_identities = Gauge(
            "facegate_index_identities", "Identities in the loaded index", registry=r
        )
        self.index_vectors = Gauge(
            "facegate_index_vectors", "Vectors in the loaded index", registry=r
        )
        self.threshold = Gauge(
            "facegate_threshold", "Identity similarity threshold in use", registry=r
        )
        self.threshold.set(threshold)
        self.replica_threshold = Gauge(
            "facegate_replica_threshold",
            "Replica similarity threshold in use (NaN when the index has no replica features)",
            registry=r,
        )
        self.replica_threshold.set(float("nan"))
        self.index_info = Info(
            "facegate_index", "The live identity index: fingerprint, format, type", registry=r
        )
        self._reload_metrics(r)
        self.inflight = Gauge("facegate_inflight_requests", "RPCs in progress", registry=r)
        self.ready = Gauge(
            "facegate_ready", "1 when serving, 0 while starting or draining", registry=r
        )
        self.build_info = Info("facegate_build", "Build and model information", registry=r)
        self.config_info = Info("facegate_config", "Effective configuration", registry=r)
        self.audit_dropped = Counter(
            "facegate_audit_dropped_lines",
            "Audit lines dropped because the writer fell behind (also reported in the log)",
            registry=r,
        )

    def _reload_metrics(self, r: CollectorRegistry) -> None:
        self.index_reloads = Counter(
            "facegate_index_reloads",
            "Index reloads (SIGHUP or file watch) by result: success, failure (refused: "
            "corrupt, mismatched...), refused_looser (looser thresholds, no acknowledgement), "
            "refused_diverged (would undo identity edits of the index serving, no rollback "
            "recorded against it)",
            ["result"],
            registry=r,
        )
        for result in RELOAD_RESULTS:
            self.index_reloads.labels(result)
        self.index_loaded_at = Gauge(
            "facegate_index_last_reload_timestamp_seconds",
            "Unix time the live index was loaded (at startup, then each successful reload)",
            registry=r,
        )
        self.shadow_candidates = Counter(
            "facegate_shadow_candidates",
            "Candidates also decided with the shadow thresholds, by how that verdict differs "
            "from the one in force (same, would_reject, would_pass)",
            ["change"],
            registry=r,
        )
        for change in SHADOW_CHANGES:
            self.shadow_candidates.labels(change)
        self.shadow_threshold = Gauge(
            "facegate_shadow_threshold",
            "Shadow threshold by signal (NaN when no shadow threshold is configured)",
            ["signal"],
            registry=r,
        )
        for signal in SIGNALS:
            self.shadow_threshold.labels(signal).set(float("nan"))

    # FactsObserver (service.reload, through its ReloadFacts adapter)
    def index_loaded(self, facts: LiveIndexFacts) -> None:
        """The live index and thresholds: at startup and after each successful reload."""
        self.index_info.info(
            {
                "fingerprint": facts.fingerprint,
                "format": facts.format_version,
                "index_type": facts.index_type,
                "calibrated": "true" if facts.calibrated else "false",
            }
        )
        self.index_identities.set(facts.identities)
        self.index_vectors.set(facts.vectors)
        self.set_thresholds(facts.identity_threshold, facts.replica_threshold)
        for signal, value in (
            ("identity", facts.shadow_identity),
            ("replica", facts.shadow_replica),
        ):
            self.shadow_threshold.labels(signal).set(float("nan") if value is None else value)
        self.index_loaded_at.set(facts.loaded_at)

    def reload_finished(self, result: str) -> None:
        self.index_reloads.labels(result if result in RELOAD_RESULTS else RELOAD_FAILURE).inc()

    # ShadowObserver (filter.shadow)
    def shadow(self, change: str) -> None:
        if change in SHADOW_CHANGES:
            self.shadow_candidates.labels(change).inc()

    # PipelineObserver (service.engine)
    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage == GENERATE:
            self.generate_seconds.labels(GENERATE).observe(seconds)
        elif stage in STAGES:
            self.filter_seconds.labels(stage).observe(seconds)

    def candidate(self, verdict: ImageVerdict) -> None:
        self.candidates.labels(verdict_outcome(verdict)).inc()
        for similarity in verdict.face_similarities:
            if math.isfinite(similarity):  # one NaN would poison the histogram's sum for good
                self.similarity.observe(similarity)

    def set_thresholds(self, identity: float, replica: float | None) -> None:
        """Export the thresholds in force and align the similarity bins with the identity
        threshold (known only once the index and its saved calibration are loaded)."""
        self.threshold.set(identity)
        self.replica_threshold.set(float("nan") if replica is None else replica)
        self.similarity.align(identity)

    def released(self, attempts: int) -> None:
        self.attempts.observe(attempts)

    def unfilled(self, slots: int) -> None:
        self.unfilled_slots.inc(slots)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def request_done(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code if code in GRPC_CODES else "UNKNOWN").inc()
        self.request_seconds.labels(method).observe(seconds)

    def serve(self, endpoint: MetricsEndpoint) -> int:
        """Start the /metrics endpoint (service.metrics_http); returns the bound port."""
        self._http_server = MetricsHttpServer(self.registry, endpoint)
        return self._http_server.port

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where /metrics listens (host, port), None when it does not."""
        return None if self._http_server is None else self._http_server.address

    def stop_serving(self) -> None:
        if self._http_server is not None:
            self._http_server.stop()
            self._http_server = None
