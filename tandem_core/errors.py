"""Every error Tandem raises on purpose, in one tree rooted at ``TandemError``, drawn here once.

    TandemError
    ├── ConfigError                 a settings file or value is wrong; the message says which
    ├── SecretMissingError          a secret is in neither the keyring nor the environment
    ├── ModelError                  llama.cpp failed (translated in tandem_core/base_model.py)
    │   ├── ModelLoadError          the GGUF file is missing or does not load
    │   ├── ContextOverflowError    the sequence does not fit n_ctx
    │   └── TokenizerMismatchError  two models, a model and a head, or a caller and the
    │                               expert disagree on the vocabulary (the gateway: 422)
    ├── CancelledError              batch_engine.py: a sequence's request was cancelled while it
    │                               waited for the engine
    ├── SwitchError                 the ONNX switch head failed (translated in switch.py)
    │   └── SwitchMismatchError     the head was made for another base model
    ├── ExpertError                 a remote expert call failed (translated in expert.py)
    │   ├── ExpertDeniedError       the policy or the audit log refused a retry; nothing was sent
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
        ├── TorchMissingError       torch_import.py: torch is not installed
        ├── ToyBuildError           cli_toy.py: `tandem toy build` was asked the impossible
        ├── CollectError            collect.py: bad corpus, unusable model, failing expert
        ├── TrainingError           train.py: the head cannot be trained from the data
        ├── CalibrationError        calibrate.py: no threshold fits the request
        ├── ExportError             onnx_export.py: ONNX export or its parity check failed
        ├── EvaluationError         evaluate.py: the evaluation cannot run
        ├── PipelineError           pipeline.py: the toy pipeline failed
        ├── GSM8KError              gsm8k.py: the GSM8K file is missing or malformed
        ├── MathExpertError         math_expert.py: the shipped math expert weights are unusable
        └── PresetError             smollm2_math.py: the shipped SmolLM2 head is missing

Where each class lives follows the dependency rules (docs/DESIGN.md, "Dependency rules"): the
root and the errors both sides of the wire raise are defined here, in ``tandem_core.errors``:
``TandemError``, ``ConfigError``, the ``ModelError`` family (the llama.cpp wrapper in
``tandem_core.base_model`` raises them on both sides; the gateway answers a
``TokenizerMismatchError`` with 422) and ``ExpertError`` > ``ExpertRejectedError`` >
``SessionLostError`` (the gateway raises it, the client resends the whole prefix; 409).
The on-premise errors are defined in ``client/errors.py``, the gateway's ``GatewayError`` family
in ``expert_gateway/errors.py``, each offline tool's error in its ``export/`` module.

Foreign exceptions (httpx, llama.cpp, onnxruntime, sqlite3, keyring) are translated at exactly one
boundary per dependency with ``raise X(...) from exc``; callers never match message text. The
CLI prints any ``TandemError`` as one line and exits non-zero (tracebacks with ``--debug``).
``tests/test_error_tree.py`` checks that every exception class in the packages is in this tree.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base of every error Tandem raises on purpose."""


class ConfigError(TandemError):
    """A settings file or value is wrong."""


class ModelError(TandemError):
    """llama.cpp failed."""


class ModelLoadError(ModelError):
    """The GGUF file is missing or llama.cpp could not load it."""


class ContextOverflowError(ModelError):
    """The sequence would not fit the model's context window."""


class TokenizerMismatchError(ModelError):
    """Two models (base and expert, or a model and a head) were built for different vocabularies."""


class ExpertError(TandemError):
    """A call to the remote expert failed.

    ``delivered``: the request body may have reached the gateway (True unless the client knows
    it did not, e.g. the connection was refused). ``answered``: the gateway sent a reply.
    """

    delivered: bool = True
    answered: bool = False


class ExpertRejectedError(ExpertError):
    """The gateway refused the request."""

    def __init__(self, message: str, *, status_code: int, error_type: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type


class SessionLostError(ExpertRejectedError):
    """The gateway no longer holds the session: resend the whole allowed prefix."""

    def __init__(self, message: str, *, status_code: int = 409,
                 error_type: str = "session_lost") -> None:
        super().__init__(message, status_code=status_code, error_type=error_type)
