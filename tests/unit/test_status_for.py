"""status_for: every domain error to its one gRPC status, with a caller-safe message."""

from __future__ import annotations

import logging

import grpc
import pytest

from filter.errors import FilterError
from service.errors import (
    DeadlineExceeded,
    FilterFailure,
    InvalidRequest,
    NothingPassed,
    NotReady,
    Overloaded,
    ServiceError,
    SigningFailure,
)
from service.servicer import status_for

SECRET = "similarity 0.8765 to synthetic-1-0003 in /srv/index/vectors.npy"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequest("count must be between 1 and 8"), grpc.StatusCode.INVALID_ARGUMENT),
        (Overloaded("at its limit"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotReady("server is starting"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("deadline exceeded"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (NothingPassed("no candidate passed", object()), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_each_caller_error_has_its_status_and_keeps_its_message(
    error: ServiceError, code: grpc.StatusCode
) -> None:
    assert status_for(error) == (code, str(error))


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (FilterFailure(SECRET), "identity filter failed; no image was released"),
        (FilterError(SECRET), "identity filter failed; no image was released"),
        (SigningFailure(SECRET), "content credentials could not be signed; no image was released"),
    ],
)
def test_a_failure_after_the_request_is_internal_and_its_message_stays_in_the_log(
    error: Exception, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="service.servicer"):
        code, message = status_for(error)
    assert (code, message) == (grpc.StatusCode.INTERNAL, said)
    assert SECRET in caplog.text  # the operator sees why; the caller does not


def test_every_domain_error_is_mapped_on_purpose() -> None:
    """A new ServiceError subclass must get its own row above, not fall through to INTERNAL."""
    mapped = {
        InvalidRequest,
        Overloaded,
        NotReady,
        DeadlineExceeded,
        NothingPassed,
        FilterFailure,
        SigningFailure,
    }
    assert set(ServiceError.__subclasses__()) == mapped


def test_an_unknown_exception_is_internal_and_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise KeyError(SECRET)
    except KeyError as exc:
        error = exc
    with caplog.at_level(logging.ERROR, logger="service.servicer"):
        code, message = status_for(error)
    assert (code, message) == (grpc.StatusCode.INTERNAL, "internal error; no image was released")
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and record.exc_info[1] is error
    assert "Traceback" in caplog.text and "raise KeyError" in caplog.text
