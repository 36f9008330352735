"""Every error Tandem raises on purpose, in one tree rooted at ``TandemError``.

    TandemError
    ├── ConfigError                 a settings file or value is wrong; the message says which
    ├── SecretMissingError          a secret is in neither the keyring nor the environment
    ├── ModelError                  llama.cpp failed (translated in base_model.py)
    │   ├── ModelLoadError          the GGUF file is missing or does not load
    │   ├── ContextOverflowError    the sequence does not fit n_ctx
    │   └── TokenizerMismatchError  two models, a model and a head, or a caller and the
    │                               expert disagree on the vocabulary (the gateway: 422)
    ├── SwitchError                 the ONNX switch head failed (translated in switch.py)
    │   └── SwitchMismatchError     the head was made for another base model
    ├── ExpertError                 a remote expert call failed (translated in expert.py)
    │   ├── ExpertUnavailableError  connect error, timeout, 5xx, or circuit open
    │   │   └── CircuitOpenError    the breaker is open: no call was made
    │   └── ExpertRejectedError     the gateway refused the request (4xx)
    │       ├── ExpertAuthError     401 / 403
    │       ├── ExpertRateLimitedError  429, with retry_after seconds
    │       └── SessionLostError    409: the gateway no longer holds the session (the
    │                               gateway raises it, the client resends the whole prefix)
    ├── PolicyError                 the egress policy could not be evaluated
    ├── AuditError                  the audit log could not be written or read
    │   └── AuditVerifyError        the chain is broken; names the first bad line
    ├── DocumentError               a document could not be stored or found
    │   ├── DocumentTooLargeError   413 from the daemon
    │   ├── DocumentParseError      422 from the daemon
    │   └── DocumentNotFoundError   404 from the daemon
    ├── QueueFullError              the daemon's model queue is full (503, Retry-After)
    │   └── ClientQueueFullError    this client already has its share waiting (429)
    ├── ApiError                    client/openai_api.py: a daemon request is invalid; carries
    │                               its HTTP status and OpenAI error type
    ├── GatewayError                expert_gateway/errors.py: 500 unless a subclass says otherwise
    │   ├── BadRequestError         400  the body is not JSON, or not an object
    │   ├── AuthError               401  no key, unknown key, revoked key
    │   ├── ForbiddenError          403  the key may not use this route or model
    │   ├── NotFoundError           404  unknown route or model name
    │   ├── PayloadTooLargeError    413  the body exceeds server.max_body_bytes
    │   ├── InvalidRequestError     422  out of bounds: token ids, lengths, max_tokens
    │   ├── RateLimitedError        429  a per-key quota is spent; carries retry_after
    │   ├── UnavailableError        503  the backend failed or the queue is full
    │   │   └── BackendError             a backend call failed (translated in backends/)
    │   └── KeyStoreError                the keys file cannot be read or written (CLI)
    └── offline tooling, one class per export/ module (needs the train extra)
        ├── GGUFWriteError          gguf_writer.py: a GGUF cannot be read or written
        ├── TorchMissingError       toy_model.py: torch is not installed
        ├── ToyBuildError           cli_toy.py: `tandem toy build` was asked the impossible
        ├── CollectError            collect.py: bad corpus, unusable model, failing expert
        ├── TrainingError           train.py: the head cannot be trained from the data
        ├── CalibrationError        calibrate.py: no threshold fits the request
        ├── ExportError             onnx_export.py: ONNX export or its parity check failed
        ├── EvaluationError         evaluate.py: the evaluation cannot run
        └── PipelineError           pipeline.py: the toy pipeline failed

Errors both sides of the wire raise (``SessionLostError``, ``TokenizerMismatchError``) are defined
once, here; the gateway maps them to their HTTP status in ``expert_gateway/errors.py``. Foreign
exceptions (httpx, llama.cpp, onnxruntime, sqlite3, keyring) are translated at exactly one
boundary per dependency with ``raise X(...) from exc``; callers never match message text. The
CLI prints any ``TandemError`` as one line and exits non-zero (tracebacks with ``--debug``).
``tests/test_error_tree.py`` checks that every exception class in the packages is in this tree.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base of every error Tandem raises on purpose."""


class ConfigError(TandemError):
    """A settings file or value is wrong."""


class SecretMissingError(TandemError):
    """A secret was found neither in the keyring nor in the environment."""


class ModelError(TandemError):
    """llama.cpp failed."""


class ModelLoadError(ModelError):
    """The GGUF file is missing or llama.cpp could not load it."""


class ContextOverflowError(ModelError):
    """The sequence would not fit the model's context window."""


class TokenizerMismatchError(ModelError):
    """Two models (base and expert, or a model and a head) were built for different vocabularies."""


class SwitchError(TandemError):
    """The ONNX switch head failed to load or run."""


class SwitchMismatchError(SwitchError):
    """The switch head was trained for another base model."""


class ExpertError(TandemError):
    """A call to the remote expert failed.

    ``delivered``: the request body may have reached the gateway (True unless the client knows
    it did not, e.g. the connection was refused). ``answered``: the gateway sent a reply.
    """

    delivered: bool = True
    answered: bool = False


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


class ExpertRejectedError(ExpertError):
    """The gateway refused the request."""

    def __init__(self, message: str, *, status_code: int, error_type: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type


class ExpertAuthError(ExpertRejectedError):
    """The gateway refused our credentials."""


class ExpertRateLimitedError(ExpertRejectedError):
    """The gateway rate-limited us; retry_after says for how long."""

    def __init__(self, message: str, *, status_code: int = 429, error_type: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(message, status_code=status_code, error_type=error_type)
        self.retry_after = retry_after


class SessionLostError(ExpertRejectedError):
    """The gateway no longer holds the session: resend the whole allowed prefix."""

    def __init__(self, message: str, *, status_code: int = 409,
                 error_type: str = "session_lost") -> None:
        super().__init__(message, status_code=status_code, error_type=error_type)


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
