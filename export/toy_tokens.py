"""How the toy pair's training and evaluation turn examples into token ids.

Shared by the build (``toy.py``) and its evaluation (``toy_eval.py``); it imports neither, so the
two do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from export import toy_data
from export.gguf_writer import Vocabulary


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """The default vocabulary: a token per byte, id == byte value."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class LlamaCppTokenizer:
    """Tokenize with llama.cpp itself, for a vocabulary taken from another GGUF."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self._llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def encode(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    answer_ids: list[int]
    head_length: int  # answer tokens up to and including "="; the rest is result, ".", EOS


def encode_prompt(tokenizer: Tokenizer, passage: str, question: str) -> list[int]:
    """Each prompt segment tokenized on its own and concatenated, as the client does."""
    from client.prompting import plain_prompt

    return [tok for seg in plain_prompt([passage], question) for tok in tokenizer.encode(seg.text)]


def tokenize_example(
    tokenizer: Tokenizer, vocabulary: Vocabulary, example: toy_data.Example, answer: str
) -> TokenizedExample:
    head, tail = answer[: answer.rindex("=") + 1], answer[answer.rindex("=") + 1 :]
    head_ids = tokenizer.encode(head)
    prompt_ids = [vocabulary.bos_id, *encode_prompt(tokenizer, example.passage, example.question)]
    answer_ids = [*head_ids, *tokenizer.encode(tail), vocabulary.eos_id]
    return TokenizedExample(prompt_ids, answer_ids, len(head_ids))
