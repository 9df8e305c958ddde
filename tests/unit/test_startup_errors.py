"""A server that cannot start says why in a line naming the setting, never a traceback
(review findings: an unresolvable metrics host escaped as socket.gaierror)."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry

from service.metrics_http import MetricsConfigError, MetricsEndpoint, MetricsHttpServer


def test_a_metrics_host_that_does_not_resolve_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_such_host(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(MetricsConfigError, match="FACEGATE_METRICS_HOST") as info:
        MetricsHttpServer(CollectorRegistry(), MetricsEndpoint("metrics.example", 0))
    assert "metrics.example" in str(info.value) and "not known" in str(info.value)
