"""The expert's shared continuation code: the log-prob report is the full log-softmax's, bit
for bit, however it is computed."""

from __future__ import annotations

import numpy as np
import pytest

from tandem_core.continuation import token_logprob
from tandem_core.protocol import log_softmax


@pytest.mark.parametrize("top", [0, 3])
def test_a_tokens_logprob_equals_the_full_log_softmax_bit_for_bit(top: int) -> None:
    generator = np.random.default_rng(0)
    for scale in (0.1, 3.0, 40.0):
        logits = (generator.standard_normal(49_152) * scale).astype(np.float32)
        full = log_softmax(np.asarray(logits, dtype=np.float64))
        for token in (0, int(np.argmax(logits)), 49_151, 1234):
            reported = token_logprob(logits, token, top=top)
            assert reported.logprob == float(full[token])
            order = np.argsort(-full, kind="stable")[:top]
            assert reported.top == [(int(index), float(full[index])) for index in order]
