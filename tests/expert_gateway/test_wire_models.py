from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tandem_core.protocol import (
    MAX_CONTINUE_TOKENS,
    ContinueRequest,
    log_softmax,
    positional_uniform,
    sample_from_logits,
)

FINGERPRINT = "ab" * 32


def _request(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "session": "s-1", "model": "toy-expert", "held": 0, "tokens": [1, 2, 3],
        "max_tokens": 4, "tokenizer": FINGERPRINT,
    }
    return {**body, **overrides}


def test_continue_request_accepts_a_valid_body() -> None:
    request = ContinueRequest.model_validate(_request())
    assert request.temperature == 0.0
    assert request.seed is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_tokens": MAX_CONTINUE_TOKENS + 1},
        {"max_tokens": 0},
        {"tokens": [-1]},
        {"held": -3},
        {"tokenizer": "not-a-fingerprint"},
        {"session": "has spaces"},
        {"unexpected": 1},
    ],
)
def test_continue_request_rejects_out_of_bounds(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ContinueRequest.model_validate(_request(**overrides))


def test_greedy_sampling_is_argmax() -> None:
    assert sample_from_logits([0.1, 3.0, 2.0], temperature=0.0, seed=7, position=3) == 1


def test_seeded_sampling_depends_only_on_seed_and_position() -> None:
    logits = np.linspace(-1.0, 1.0, 50)
    first = [sample_from_logits(logits, temperature=1.0, seed=11, position=p) for p in range(40)]
    again = [sample_from_logits(logits, temperature=1.0, seed=11, position=p) for p in range(40)]
    other = [sample_from_logits(logits, temperature=1.0, seed=12, position=p) for p in range(40)]
    assert first == again
    assert first != other


def test_seeded_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    draws = [sample_from_logits(logits, temperature=1.0, seed=3, position=p) for p in range(3000)]
    frequencies = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(frequencies, [0.7, 0.2, 0.1], atol=0.03)


def test_positional_uniform_is_in_unit_interval() -> None:
    values = [positional_uniform(5, position) for position in range(100)]
    assert all(0.0 <= value < 1.0 for value in values)


def test_log_softmax_normalises() -> None:
    result = log_softmax(np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 1000.0]]))
    assert np.allclose(np.exp(result).sum(axis=-1), 1.0)
