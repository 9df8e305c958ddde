"""Admission budgets: per verified client subject, per subject's own limit, and per peer
address for callers without a certificate."""

from __future__ import annotations

import pytest

from service.errors import Overloaded
from service.metrics import ServiceMetrics
from service.servicer import Admission


def test_per_client_concurrency_limit() -> None:
    admission = Admission(10, ServiceMetrics(0.4), max_per_client=1)
    admission.ready = True
    admission.enter("CN=alice")
    with pytest.raises(Overloaded, match="this client"):
        admission.enter("CN=alice")
    admission.enter("CN=bob")  # another subject has its own budget
    admission.enter(None)  # anonymous callers have only the global limit
    admission.leave("CN=alice")
    admission.enter("CN=alice")
    assert admission.inflight == 3


def test_a_subject_can_carry_its_own_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import load_settings

    monkeypatch.setenv("FACEGATE_CLIENT_CONCURRENCY", '{"CN=batch,O=facegate": 2}')
    limits = load_settings().client_concurrency
    assert limits == {"CN=batch,O=facegate": 2}
    admission = Admission(10, ServiceMetrics(0.4), max_per_client=1, client_limits=limits)
    admission.ready = True
    admission.enter("CN=batch,O=facegate")
    admission.enter("CN=batch,O=facegate")
    with pytest.raises(Overloaded, match="limit of 2"):
        admission.enter("CN=batch,O=facegate")
    admission.enter("CN=alice")
    with pytest.raises(Overloaded, match="limit of 1"):
        admission.enter("CN=alice")


def test_without_a_client_certificate_the_budget_is_the_peer_address() -> None:
    from service.client_identity import peer_address

    admission = Admission(10, ServiceMetrics(0.4), max_per_peer=1)
    admission.ready = True
    admission.enter(None, "ipv4:10.0.0.7")
    with pytest.raises(Overloaded, match="this client"):
        admission.enter(None, "ipv4:10.0.0.7")
    admission.enter(None, "ipv4:10.0.0.8")  # another address, its own budget
    admission.enter("CN=alice", "ipv4:10.0.0.7")  # a verified subject: the subject's budget
    admission.leave(None, "ipv4:10.0.0.7")
    admission.enter(None, "ipv4:10.0.0.7")
    assert admission.inflight == 3
    assert peer_address("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_address("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_address("unix:/run/facegate.sock") == "unix:/run/facegate.sock"
