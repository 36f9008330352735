"""The OpenAI-compatible wire format: request bodies, reply and stream-chunk shapes, errors.

Requests are validated by pydantic (a bad body is a 400 in OpenAI's error shape, never a 500).
Replies carry OpenAI's fields plus a ``tandem`` object: per-token text, provenance and deferral
probability, the passages used, and what the answer sent off the machine.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from client.assistant import Answer, AnswerToken
from client.egress import EgressSummary
from tandem_core.errors import TandemError


class ApiError(TandemError):
    """An error answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}


def error_json(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": str(error), "type": error.error_type, "param": error.param,
                      "code": error.status}}


# -- request bodies -----------------------------------------------------------------------------

class _Body(BaseModel):
    # Unknown OpenAI fields (top_p, logit_bias, ...) are accepted and ignored, as other
    # OpenAI-compatible servers do, so existing client code keeps working.
    model_config = ConfigDict(extra="ignore")


# Bounds on what one request may carry. A prompt longer than the model's context window is
# refused anyway; these stop a hostile body from costing memory and time before that check.
MAX_CONTENT_CHARS = 200_000
MAX_CONTENT_PARTS = 64
MAX_MESSAGES = 512
MAX_PROMPT_CHARS = 400_000


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: (Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]
              | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None) = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class TandemOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retrieve: bool | None = Field(default=None, description="search the documents for passages")


class GenerationBody(_Body):
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice is supported")
    user: str | None = Field(default=None, max_length=256)
    tandem: TandemOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(len(stop) > 256 for stop in stops):
            raise ApiError(400, "stop takes at most 4 sequences of at most 256 characters",
                           param="stop")
        return [stop for stop in stops if stop]


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)

    @model_validator(mode="after")
    def _bounded_conversation(self) -> ChatCompletionBody:
        total = sum(len(message.text()) for message in self.messages)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold {total} characters; at most {MAX_PROMPT_CHARS}")
        return self


class CompletionBody(GenerationBody):
    prompt: (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
             | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]],
                         Field(min_length=1, max_length=1)]) = Field(
        description="the text to continue; a list may hold one prompt")
    echo: bool = False


class TextDocumentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    text: str = Field(max_length=64 * 1024 * 1024)
    media_type: Literal["text/plain", "text/markdown", "text/html"] = "text/plain"


# -- replies ------------------------------------------------------------------------------------

def tandem_extra(answer: Answer) -> dict[str, Any]:
    """The ``tandem`` object of a reply: per-token provenance, passages and egress summary."""
    return {
        "request_id": answer.request_id,
        "tokens": [token_json(token) for token in answer.tokens],
        "provenance": answer.provenance_counts,
        "passages": [{"document_id": p.document_id, "document_name": p.document_name,
                      "ordinal": p.ordinal} for p in answer.passages],
        "egress": egress_json(answer.egress),
    }


def egress_json(egress: EgressSummary) -> dict[str, Any]:
    """The fields the audit log can also tell, so a reply reads the same however it ended."""
    return {"calls": egress.calls, "tokens_sent": egress.tokens_sent, "denials": egress.denials,
            "failures": egress.failures, "destinations": egress.destinations,
            "attempted": egress.calls, "delivered": egress.delivered,
            "tokens_delivered": egress.tokens_delivered, "answered": egress.answered}


def token_json(token: AnswerToken) -> dict[str, Any]:
    return {"text": token.text, "provenance": token.provenance,
            "deferral_probability": round(float(token.deferral_probability), 6)}


def usage(answer: Answer) -> dict[str, int]:
    completion = len(answer.tokens)
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens + completion}


def finish_reason(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


class ChatShape:
    """How chat completions look on the wire."""

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id, self.model, self.created = request_id, model, int(time.time())

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": kind, "created": self.created,
                "model": self.model, "choices": choices}

    def whole(self, answer: Answer) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                  "logprobs": None, "finish_reason": finish_reason(answer)}
        return {**self._envelope("chat.completion", [choice]), "usage": usage(answer),
                "tandem": tandem_extra(answer)}

    def first_chunk(self) -> dict[str, Any] | None:
        return self._envelope("chat.completion.chunk", [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def token_chunk(self, token: AnswerToken) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk", [
            {"index": 0, "delta": {"content": token.text}, "finish_reason": None}]),
            "tandem": {"tokens": [token_json(token)]}}

    def last_chunk(self, answer: Answer) -> dict[str, Any]:
        extra = tandem_extra(answer)
        del extra["tokens"]  # already sent, one chunk per token
        return {**self._envelope("chat.completion.chunk", [
            {"index": 0, "delta": {}, "finish_reason": finish_reason(answer)}]), "tandem": extra}

    def usage_chunk(self, answer: Answer) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk", []), "usage": usage(answer)}


class CompletionShape(ChatShape):
    """How text completions look on the wire."""

    def __init__(self, request_id: str, model: str, echo: str) -> None:
        super().__init__(request_id, model)
        self.echo = echo

    def whole(self, answer: Answer) -> dict[str, Any]:
        choice = {"index": 0, "text": self.echo + answer.text, "logprobs": None,
                  "finish_reason": finish_reason(answer)}
        return {**self._envelope("text_completion", [choice]), "usage": usage(answer),
                "tandem": tandem_extra(answer)}

    def first_chunk(self) -> dict[str, Any] | None:
        if not self.echo:
            return None
        return self._envelope("text_completion", [
            {"index": 0, "text": self.echo, "logprobs": None, "finish_reason": None}])

    def token_chunk(self, token: AnswerToken) -> dict[str, Any]:
        return {**self._envelope("text_completion", [
            {"index": 0, "text": token.text, "logprobs": None, "finish_reason": None}]),
            "tandem": {"tokens": [token_json(token)]}}

    def last_chunk(self, answer: Answer) -> dict[str, Any]:
        extra = tandem_extra(answer)
        del extra["tokens"]
        return {**self._envelope("text_completion", [
            {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason(answer)}]),
            "tandem": extra}

    def usage_chunk(self, answer: Answer) -> dict[str, Any]:
        return {**self._envelope("text_completion", []), "usage": usage(answer)}
