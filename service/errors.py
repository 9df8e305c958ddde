"""Domain errors of the service core; the servicer maps each to one gRPC status."""


class ServiceError(Exception):
    """Base of the errors the core raises on purpose."""


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


class InvalidRequest(ServiceError):
    """The request is malformed or out of range."""


class Overloaded(ServiceError):
    """Too many requests in flight; the caller should back off."""


class NotReady(ServiceError):
    """The server is starting up or draining."""


class FilterFailure(ServiceError):
    """The generator or the identity filter failed; nothing is released (fail closed)."""


class NothingPassed(ServiceError):
    """No candidate of any slot passed the filter within the attempt budget."""

    def __init__(self, message: str, summary: object) -> None:
        super().__init__(message)
        self.summary = summary


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the slots were filled."""


class SigningFailure(ServiceError):
    """A released image could not be given its content credentials (C2PA); with signing
    configured, nothing is released unsigned (fail closed)."""
