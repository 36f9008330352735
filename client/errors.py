"""The on-premise side's errors: switch, expert calls, policy, audit, documents and the queue.

The whole tree, with the errors both sides raise (``TandemError``, ``ConfigError``, the
``ModelError`` family, ``ExpertError``, ``ExpertRejectedError``, ``SessionLostError``), is drawn
once in ``tandem_core/errors.py`` and defined there; the classes below hang under it.
"""

from __future__ import annotations

from tandem_core.errors import ExpertError, ExpertRejectedError, TandemError


class SecretMissingError(TandemError):
    """A secret was found neither in the keyring nor in the environment."""


class SwitchError(TandemError):
    """The ONNX switch head failed to load or run."""


class SwitchMismatchError(SwitchError):
    """The switch head was trained for another base model."""


class ExpertDeniedError(ExpertError):
    """The policy or the audit log refused a retry of a call; nothing more is sent."""

    delivered = False

    def __init__(self, reason: str) -> None:
        super().__init__(f"retry not sent: {reason}")
        self.reason = reason


class ExpertUnavailableError(ExpertError):
    """The expert could not be reached in time or answered with a server error."""


class CircuitOpenError(ExpertUnavailableError):
    """The circuit breaker is open, so no call was attempted."""


class ExpertAuthError(ExpertRejectedError):
    """The gateway refused our credentials."""


class ExpertRateLimitedError(ExpertRejectedError):
    """The gateway rate-limited us; retry_after says for how long."""

    def __init__(self, message: str, *, status_code: int = 429, error_type: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(message, status_code=status_code, error_type=error_type)
        self.retry_after = retry_after


class PolicyError(TandemError):
    """The egress policy could not be evaluated."""


class AuditError(TandemError):
    """The audit log could not be written or read."""


class AuditVerifyError(AuditError):
    """The audit chain is broken at a given line."""

    def __init__(self, message: str, *, line: int) -> None:
        super().__init__(message)
        self.line = line


class DocumentError(TandemError):
    """A document could not be ingested or found."""


class DocumentTooLargeError(DocumentError):
    """An uploaded document exceeds the configured size limit."""


class DocumentParseError(DocumentError):
    """An uploaded document could not be parsed."""


class DocumentNotFoundError(DocumentError):
    """No document has the given id."""


class QueueFullError(TandemError):
    """The model queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClientQueueFullError(QueueFullError):
    """This client already has its share of the queue waiting."""
