"""Every error the gateway raises on purpose, and the one place they become HTTP.

The classes and the HTTP status of each are drawn in the one error tree in ``tandem_core.errors``.
``SessionLostError`` (409, `held` exceeds what the gateway holds: resend all) and
``TokenizerMismatchError`` (422, the caller's vocabulary is not the expert's) sit outside
``GatewayError``.

Both are defined once in ``tandem_core.errors``, because the client raises and handles the
same conditions; ``SHARED_ERRORS`` gives their status here. A tokenizer mismatch is a 422 rather
than a 409: nothing the client can resend fixes it, while a 409 means "resend the whole prefix".
Foreign exceptions (llama.cpp, torch, httpx) are translated in the backend that calls them, with
``raise BackendError(...) from exc``.
"""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tandem_core.errors import SessionLostError, TandemError, TokenizerMismatchError
from tandem_core.protocol import ERROR_TYPES, ErrorBody, ErrorReply


class GatewayError(TandemError):
    """Base of the gateway's errors; ``status_code`` is the HTTP status it answers with."""

    status_code = 500


class BadRequestError(GatewayError):
    """The body could not be read as a JSON object."""

    status_code = 400


class AuthError(GatewayError):
    """The bearer key is missing, unknown or revoked."""

    status_code = 401


class ForbiddenError(GatewayError):
    """The key is valid but not allowed to do this."""

    status_code = 403


class NotFoundError(GatewayError):
    """No such route or model."""

    status_code = 404


class PayloadTooLargeError(GatewayError):
    """The request body is larger than allowed."""

    status_code = 413


class InvalidRequestError(GatewayError):
    """The request is well-formed JSON but out of bounds."""

    status_code = 422


class RateLimitedError(GatewayError):
    """A per-key quota is spent; ``retry_after`` seconds until it is not."""

    status_code = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(GatewayError):
    """The gateway cannot serve this now (backend failure, full queue)."""

    status_code = 503


class BackendError(UnavailableError):
    """A backend (llama.cpp, torch, an upstream server) failed."""


class KeyStoreError(GatewayError):
    """The API keys file could not be read or written."""


# Errors defined in tandem_core.errors because both sides raise them, and the status each answers with.
SHARED_ERRORS: dict[type[TandemError], int] = {SessionLostError: 409, TokenizerMismatchError: 422}


def error_response(status_code: int, message: str, *, retry_after: float | None = None) -> JSONResponse:
    """The single shape of every error reply: ``{"error": {"type", "message"}}``."""
    error_type = ERROR_TYPES.get(status_code, "internal_error" if status_code >= 500 else "error")
    body = ErrorReply(error=ErrorBody(type=error_type, message=message))
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def response_for(exc: Exception) -> JSONResponse:
    """Turn any exception reaching the app boundary into its JSON error reply."""
    if isinstance(exc, RateLimitedError):
        return error_response(exc.status_code, str(exc), retry_after=exc.retry_after)
    if isinstance(exc, GatewayError):
        return error_response(exc.status_code, str(exc))
    for shared, status_code in SHARED_ERRORS.items():
        if isinstance(exc, shared):
            return error_response(status_code, str(exc))
    if isinstance(exc, RequestValidationError):
        return error_response(422, _describe_validation(exc))
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, str(exc.detail))
    return error_response(500, "internal error")


def _describe_validation(exc: RequestValidationError) -> str:
    """A short, content-free description: where and what, never the offending values."""
    problems = []
    for problem in exc.errors()[:3]:
        if problem.get("type") == "json_invalid":
            return "malformed JSON body"
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {problem.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler registered on the app for every error class above."""
    return response_for(exc)
