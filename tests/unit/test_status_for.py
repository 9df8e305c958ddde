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


@pytest.mark.parametrize("wrapper", [SigningFailure, FilterFailure])
def test_a_wrapped_failure_is_logged_with_the_traceback_of_its_cause(
    wrapper: type[ServiceError], caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the signer (an AttributeError wrapped as SigningFailure) was logged as one
    line of text: nothing said where it was raised."""

    def signer() -> None:
        raise AttributeError("'ReleaseFacts' object has no attribute 'no_such_field'")

    try:
        try:
            signer()
        except AttributeError as cause:
            raise wrapper("content signer failed") from cause
    except ServiceError as exc:
        error = exc
    with caplog.at_level(logging.ERROR, logger="service.servicer"):
        code, _message = status_for(error)
    assert code == grpc.StatusCode.INTERNAL
    assert "Traceback" in caplog.text and "in signer" in caplog.text


def test_a_unary_response_too_large_to_send_is_refused_as_invalid() -> None:
    """30 images of 3 MB (a large-frame generator) were generated, filtered and counted
    OK, then gRPC failed the send with a raw RESOURCE_EXHAUSTED that invites a retry."""
    from service.pipeline import GenerationResult, GenerationSummary, ReleasedImage
    from service.servicer import result_to_proto
    from service.tls import MAX_MESSAGE_BYTES

    def result(count: int, size: int) -> GenerationResult:
        images = [
            ReleasedImage(slot, bytes(size), "image/png", 1, 1024, 1024) for slot in range(count)
        ]
        return GenerationResult(images, GenerationSummary(count, 1, "r", released=count))

    fits = result(2, 3_000_000)
    assert len(result_to_proto(fits).images) == 2
    per_image = MAX_MESSAGE_BYTES // 20
    with pytest.raises(InvalidRequest, match="use GenerateStream") as refused:
        result_to_proto(result(30, per_image))
    assert status_for(refused.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_the_pipelines_response_bound_holds_for_the_largest_fields() -> None:
    """The pipeline stops a unary result by its images' bytes plus a framing bound: if the
    bound were short, a result it kept could still be refused after its images were
    counted released."""
    from service.pipeline import (
        IMAGE_FRAMING_BYTES,
        SUMMARY_FRAMING_BYTES,
        GenerationResult,
        GenerationSummary,
        ReleasedImage,
    )
    from service.servicer import result_to_proto

    top = 2**32 - 1
    images = [
        ReleasedImage(top, bytes(size), "image/jpeg", top, top, top)
        for size in (0, 127, 128, 2**14, 2**21, 2**25)  # varint lengths of 1 to 4 bytes
    ]
    request_id = "f" * 64
    summary = GenerationSummary(top, 2**64 - 1, request_id, released=top)
    summary.candidates_drawn = summary.candidates_rejected = summary.slots_unfilled = top
    bound = SUMMARY_FRAMING_BYTES + len(request_id)
    bound += sum(len(image.data) + IMAGE_FRAMING_BYTES for image in images)
    assert result_to_proto(GenerationResult(images, summary)).ByteSize() <= bound
