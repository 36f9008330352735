"""The host-memory prompt cache: bounded, least recently used out, longest shared prefix in;
and llama.cpp's sequence state saved and restored on the real toy base."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tandem_core.base_model import LlamaModel
from tandem_core.errors import ModelLoadError
from tandem_core.prompt_cache import PromptCache, SavedSequence, prompt_cache
from tests.client.test_decoding import toy_prompts


def saved(tokens: list[int], nbytes: int = 10) -> SavedSequence:
    return SavedSequence(tuple(tokens), bytearray(nbytes))


def test_the_longest_shared_prefix_wins_and_nothing_shared_finds_nothing() -> None:
    cache = PromptCache(1000)
    cache.store(saved([1, 2, 3, 4]))
    cache.store(saved([1, 2, 7, 8, 9]))
    entry, length = cache.longest([1, 2, 7, 8, 5])
    assert entry is not None and entry.tokens == (1, 2, 7, 8, 9) and length == 4
    assert cache.longest([9, 9]) == (None, 0)


def test_an_entry_another_extends_is_dropped_and_a_covered_one_is_not_stored() -> None:
    cache = PromptCache(1000)
    cache.store(saved([1, 2]))
    cache.store(saved([1, 2, 3]))  # holds all of [1, 2] and more
    cache.store(saved([1]))  # already held by [1, 2, 3]
    assert len(cache) == 1 and cache.nbytes == 10
    assert cache.longest([1, 2, 3, 4])[1] == 3


def test_the_least_recently_used_entries_go_first_beyond_the_bound() -> None:
    cache = PromptCache(25)
    cache.store(saved([1]))
    cache.store(saved([2]))
    cache.longest([1])  # [1] is now the most recently used
    cache.store(saved([3]))
    assert len(cache) == 2 and cache.nbytes == 20
    assert cache.longest([2]) == (None, 0)
    assert cache.longest([1])[1] == 1 and cache.longest([3])[1] == 1
    cache.store(saved([4], nbytes=26))  # larger than the whole cache: not kept
    assert cache.longest([4]) == (None, 0)


def test_a_cache_larger_than_the_free_memory_is_refused_at_start_up() -> None:
    assert prompt_cache(0) is None
    assert prompt_cache(4, available=2**30) is not None
    with pytest.raises(ModelLoadError, match="prompt_cache_mib"):
        prompt_cache(2048, available=2**30)
    with pytest.raises(ValueError):
        PromptCache(-1)


def test_a_saved_sequence_restores_into_another_with_bit_identical_rows(toy_pair: Any) -> None:
    with LlamaModel(toy_pair.base_gguf, n_ctx=4 * 128, n_seq_max=4, n_ctx_seq=128,
                    flash_attention=True) as model:
        prompt = model.tokenize(toy_prompts(toy_pair)[0], add_bos=True)[:40]
        model.decode(prompt, seq=1, last_only=True)
        state = model.save_sequence(1)
        assert state is not None and state.tokens == tuple(prompt) and state.nbytes > 0
        assert model.save_sequence(3) is None  # nothing held
        model.decode(prompt[:5], seq=2)
        model.restore_sequence(2, state)  # replaces what sequence 2 held
        assert model.cached_tokens(2) == prompt
        follow = prompt[:7]
        original = model.decode(follow, seq=1)
        restored = model.decode(follow, seq=2)
        np.testing.assert_array_equal(original.logits, restored.logits)
        np.testing.assert_array_equal(original.hidden, restored.hidden)
        model.rollback(20, seq=2)  # a restored sequence is cut back like any other
        model.rollback(20, seq=1)
        np.testing.assert_array_equal(model.decode(follow, seq=1).logits,
                                      model.decode(follow, seq=2).logits)
