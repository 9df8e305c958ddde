"""The similarity histogram: coarse buckets for every threshold the configuration accepts,
rebuilt on a reload; rejections counted above the threshold, and a sum no finer than
the buckets."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client import generate_latest

from filter.decide import ImageVerdict
from service.config import Settings
from service.metrics import ServiceMetrics, quantize_similarity, similarity_buckets

# Every threshold the configuration accepts ([-1, 1]), calibrated ones included.
THRESHOLDS = [-1.0, -0.95, -0.3, 0.0, 0.05, 0.29, 0.40, 0.565, 0.571, 0.99, 1.0]


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_similarity_histogram_is_coarse(threshold: float) -> None:
    edges = similarity_buckets(threshold)
    assert edges[-1] == pytest.approx(threshold)  # nothing finer than "rejected" above it
    widths = [b - a for a, b in itertools.pairwise(edges)]
    assert all(w >= 0.1 - 1e-9 for w in widths), edges
    assert 1 <= len(edges) <= 5 and edges == tuple(sorted(edges))
    assert all(edge >= -1.0 for edge in edges)


def _buckets(metrics: ServiceMetrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("facegate_similarity"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_every_accepted_threshold_starts_and_reloads(threshold: float) -> None:
    """FACEGATE_THRESHOLD=-1 ended startup in `Must have at least two buckets` (issue 19)."""
    metrics = ServiceMetrics(threshold)  # startup
    metrics.set_thresholds(0.4, None)  # a reload to another threshold
    metrics.set_thresholds(threshold, 0.9)  # and back
    metrics.candidate(_verdict(threshold, 1.0))
    buckets = _buckets(metrics)
    assert buckets["facegate_similarity_count"] == 2
    assert buckets['facegate_similarity_bucket{le="+Inf"}'] == 2


@pytest.mark.parametrize("threshold", [-1.0, -0.95, 1.0])
def test_the_server_builds_with_any_accepted_threshold(threshold: float) -> None:
    """Where `FACEGATE_THRESHOLD=-1` ended startup on main: the server's metrics."""
    from service.server import FacegateServer

    server = FacegateServer(Settings(threshold=threshold))  # type: ignore[call-arg]
    assert server.metrics.similarity.edges[-1] == threshold
    text = generate_latest(server.metrics.registry).decode()
    # A refused looser reload has its own result, exported from 0 for the alert's rate.
    assert 'facegate_index_reloads_total{result="refused_looser"} 0.0' in text
    assert 'facegate_index_reloads_total{result="refused_diverged"} 0.0' in text


def test_rejections_are_counted_above_the_threshold() -> None:
    """Each similarity lands in the bucket whose upper edge is the first at or above it.
    On main a value was moved to its bucket's lower edge first, so 4 rejections at ~1.0
    were counted in le=0.572, at or below the threshold."""
    metrics = ServiceMetrics(0.572)
    metrics.candidate(_verdict(0.999, 1.0, 0.97, 0.9))  # four rejections
    metrics.candidate(_verdict(0.52))  # just under the threshold: a pass
    metrics.candidate(_verdict(0.372, 0.05))  # exactly on an edge: in that bucket
    buckets = _buckets(metrics)
    assert buckets['facegate_similarity_bucket{le="0.572"}'] == 3  # 0.52, 0.372, 0.05
    assert buckets['facegate_similarity_bucket{le="0.472"}'] == 2  # 0.372 and 0.05, not 0.52
    assert buckets['facegate_similarity_bucket{le="0.372"}'] == 2  # 0.372 is <= 0.372
    assert buckets['facegate_similarity_bucket{le="0.272"}'] == 1
    assert buckets['facegate_similarity_bucket{le="0.0"}'] == 0
    assert buckets['facegate_similarity_bucket{le="+Inf"}'] == 7  # the 4 rejections above
    assert buckets["facegate_similarity_count"] == 7


def test_similarity_sum_carries_no_more_than_the_buckets() -> None:
    metrics = ServiceMetrics(0.40)
    metrics.candidate(_verdict(0.3456))
    text = generate_latest(metrics.registry).decode()
    (line,) = [x for x in text.splitlines() if x.startswith("facegate_similarity_sum")]
    assert float(line.split()[-1]) == pytest.approx(0.3)  # its bucket (0.3, 0.4]'s lower edge
    assert "0.3456" not in text and "0.345" not in text
    edges = similarity_buckets(0.4)
    assert quantize_similarity(0.95, edges) == pytest.approx(0.4)  # above: the threshold
    assert quantize_similarity(0.4, edges) == pytest.approx(0.3)  # le=0.4: (0.3, 0.4]
    assert quantize_similarity(-0.5, edges) == -1.0
    # A threshold change re-bins and restarts the counts (a counter reset to Prometheus).
    metrics.set_thresholds(0.6, None)
    assert _buckets(metrics)["facegate_similarity_count"] == 0


def _verdict(*similarities: float) -> ImageVerdict:
    return ImageVerdict(
        passed=False,
        reason=None,
        faces=len(similarities),
        max_similarity=max(similarities),
        identity=None,
        face_similarities=similarities,
    )
