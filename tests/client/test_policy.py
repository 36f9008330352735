"""The egress policy: remote views, deny patterns, taint tracking, caps, dry runs, reasons."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from client.egress import EgressDecision, EgressRequest
from client.errors import PolicyError
from client.policy import Policy
from client.settings import DenyPattern, PolicySettings
from client.usage import UsageStore
from tandem_core.errors import ConfigError
from tandem_core.settings import load_settings

BOS = 1000
IBAN = "DE89 3704 0044 0532 0130 00"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class MergeTokenizer:
    """Byte-level with greedy multi-byte merges, so tokens span several characters."""

    MERGES = ("Document", "Question", "Answer", " the", " is", "DE", "89", "37", "04", "00",
              "05", "32", "01", "30", " 3", " 0", "private", "IBAN", "Pay")

    def __init__(self) -> None:
        self.pieces = {index: bytes([index]) for index in range(256)}
        self.pieces[BOS] = b""  # a special token renders as nothing
        for offset, merge in enumerate(self.MERGES):
            self.pieces[256 + offset] = merge.encode()
        self.by_piece = sorted(((piece, token) for token, piece in self.pieces.items() if piece),
                               key=lambda item: -len(item[0]))

    def tokenize(self, text: str) -> list[int]:
        data, tokens = text.encode(), []
        while data:
            piece, token = next((p, t) for p, t in self.by_piece if data.startswith(p))
            tokens.append(token)
            data = data[len(piece):]
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.pieces[token] for token in tokens)


TOKENIZER = MergeTokenizer()


def text_of(tokens: Sequence[int]) -> str:
    return TOKENIZER.detokenize(tokens).decode()


def sequence(*parts: tuple[str, bool]) -> tuple[list[int], list[bool]]:
    tokens, mask = [BOS], [False]
    for text, private in parts:
        ids = TOKENIZER.tokenize(text)
        tokens += ids
        mask += [private] * len(ids)
    return tokens, mask


def make_policy(tmp_path: Path, **settings: object) -> Policy:
    policy_settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3", **settings)  # type: ignore[arg-type]
    return Policy(policy_settings, tokenizer=TOKENIZER,
                  usage=UsageStore(policy_settings.usage_db))


def ask(policy: Policy, tokens: Sequence[int], mask: Sequence[bool], *, held: Sequence[int] = (),
        request_id: str = "req") -> EgressDecision:
    return policy.decide(EgressRequest(request_id, "sess", tokens, mask, held))


PROMPT = (("Document: ", False), (f"Pay to {IBAN} by Friday, said the landlord.", True),
          ("\nQuestion: Which IBAN?\nAnswer:", False))


def test_full_mode_sends_everything_and_only_what_is_new(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, mode="full", deny_patterns=[])
    tokens, mask = sequence(*PROMPT)
    first = ask(policy, tokens, mask)
    assert (first.allowed, first.reason, list(first.remote_view), first.send_from) == (
        True, "ok", tokens, 0)
    second = ask(policy, [*tokens, 65], [*mask, False], held=first.remote_view)
    assert second.send_from == len(tokens) and list(second.new_tokens) == [65]


def test_redact_private_replaces_each_private_run_by_the_placeholder(tmp_path: Path) -> None:
    policy = make_policy(tmp_path)
    tokens, mask = sequence(("Document: ", False), ("first secret", True), ("\nDocument: ", False),
                            ("second", True), (" secret", True), ("\nQuestion: Who?\nAnswer:", False))
    decision = ask(policy, tokens, mask)
    assert decision.reason == "ok"
    assert text_of(decision.remote_view) == (
        "Document: [private]\nDocument: [private]\nQuestion: Who?\nAnswer:")
    assert decision.remote_view[0] == BOS


def test_custom_placeholder(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, placeholder="<redacted>")
    tokens, mask = sequence(("a ", False), ("b", True), (" c", False))
    assert text_of(ask(policy, tokens, mask).remote_view) == "a <redacted> c"


def test_window_keeps_the_last_tokens_and_a_stable_start(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, mode="window", window_tokens=16, deny_patterns=[])
    tokens, mask = sequence(("abcdefghijklmnopqrstuvwxyz", False))
    held: Sequence[int] = ()
    reused = 0
    for length in range(17, len(tokens) + 1):
        decision = ask(policy, tokens[:length], mask[:length], held=held)
        assert len(decision.remote_view) <= 16
        assert list(decision.remote_view) == tokens[length - len(decision.remote_view):length]
        reused += decision.send_from > 0
        held = decision.remote_view
    assert reused >= 6  # the start moves by a quarter window, so most steps only append


def test_window_still_redacts_private_spans(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, mode="window", window_tokens=64)
    tokens, mask = sequence(*PROMPT)
    view = text_of(ask(policy, tokens, mask).remote_view)
    assert "landlord" not in view and "[private]" in view


def test_redact_pattern_replaces_matches(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, mode="full")
    tokens, mask = sequence(("Write to jane.doe@example.com and to bob@x.org now", False))
    decision = ask(policy, tokens, mask)
    assert decision.reason == "ok"
    assert text_of(decision.remote_view) == "Write to [private] and to [private] now"


def test_skip_pattern_denies_the_call_and_counts_nothing(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, mode="full", per_request_calls=1)
    tokens, mask = sequence(("card 4111 1111 1111 1111 please", False))
    decision = ask(policy, tokens, mask)
    assert (decision.allowed, decision.reason, tuple(decision.remote_view)) == (
        False, "pattern:card_number", ())
    clean, clean_mask = sequence(("no card here", False))
    assert ask(policy, clean, clean_mask).reason == "ok"


def test_redaction_runs_before_skip_patterns(tmp_path: Path) -> None:
    # The IBAN's digit groups look like a card number; once redacted, nothing is left to skip.
    policy = make_policy(tmp_path, mode="full")
    tokens, mask = sequence((f"IBAN {IBAN} ok", False))
    decision = ask(policy, tokens, mask)
    assert decision.reason == "ok" and text_of(decision.remote_view) == "IBAN [private] ok"


def test_custom_skip_pattern_reason(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, deny_patterns=[
        DenyPattern(name="codename", regex=r"\bBLUEBIRD\b", action="skip")])
    tokens, mask = sequence(("Operation BLUEBIRD starts", False))
    assert ask(policy, tokens, mask).reason == "pattern:codename"


def test_a_character_split_across_tokens_is_hidden_whole(tmp_path: Path) -> None:
    # Byte-level tokens cut "ü" (two bytes) in two; hiding it must hide both pieces.
    policy = make_policy(tmp_path, mode="full", deny_patterns=[
        DenyPattern(name="city", regex="Zürich", action="redact")])
    tokens, mask = sequence(("in Zürich now", False))
    assert len(tokens) == len("in Zürich now".encode()) + 1
    assert text_of(policy.remote_view(tokens, mask)) == "in [private] now"


def _normalized(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _leaked_pieces(view_text: str, secret: str, size: int) -> list[str]:
    secret_norm = _normalized(secret)
    grams = {secret_norm[i:i + size] for i in range(len(secret_norm) - size + 1)}
    view_norm = _normalized(view_text)
    return [view_norm[i:i + size] for i in range(len(view_norm) - size + 1)
            if view_norm[i:i + size] in grams]


@pytest.mark.parametrize("mode", ["redact_private", "full", "window"])
@pytest.mark.parametrize("answer", [
    f" The IBAN is {IBAN}.",
    f" It is {IBAN.replace(' ', '')} indeed",
    f" Pay {IBAN.lower()}",
])
def test_private_iban_copied_into_the_answer_never_reaches_any_view(
    tmp_path: Path, mode: str, answer: str
) -> None:
    policy = make_policy(tmp_path, mode=mode, window_tokens=4096)
    prompt_tokens, prompt_mask = sequence(*PROMPT)
    answer_tokens = TOKENIZER.tokenize(answer)
    held: Sequence[int] = ()
    for generated in range(len(answer_tokens) + 1):
        tokens = prompt_tokens + answer_tokens[:generated]
        decision = ask(policy, tokens, prompt_mask + [False] * generated, held=held)
        assert decision.allowed, decision.reason
        view_text = text_of(decision.remote_view)
        # Three letters or digits in a row of the IBAN never appear, at any step.
        assert _leaked_pieces(view_text, IBAN, 3) == [], (generated, view_text)
        held = decision.remote_view
    assert "[private]" in text_of(held).split("Answer:")[1]


def test_answer_copying_a_private_sentence_is_private(tmp_path: Path) -> None:
    policy = make_policy(tmp_path)
    tokens, mask = sequence(*PROMPT, (" by Friday, said the landlord", False))
    view = text_of(ask(policy, tokens, mask).remote_view)
    assert "landlord" not in view
    assert view.endswith("Answer: [private]")  # whole words hidden; the space before stays


def test_short_overlaps_with_private_text_are_not_tainted(tmp_path: Path) -> None:
    policy = make_policy(tmp_path)
    tokens, mask = sequence(*PROMPT, (" said the tenant", False))
    assert text_of(ask(policy, tokens, mask).remote_view).endswith("Answer: said the tenant")


def test_full_mode_does_not_taint_plain_copies(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, mode="full")
    tokens, mask = sequence(*PROMPT, (" by Friday, said the landlord", False))
    view = text_of(ask(policy, tokens, mask).remote_view)
    assert view.endswith("by Friday, said the landlord") and IBAN not in view


@pytest.mark.parametrize(("cap", "settings", "calls", "tokens_per_call"), [
    ("per_request_calls", {"per_request_calls": 2}, 3, 1),
    ("per_request_tokens", {"per_request_tokens": 5}, 3, 2),
    ("hourly_calls", {"hourly_calls": 2}, 3, 1),
    ("hourly_tokens", {"hourly_tokens": 5}, 3, 2),
    ("daily_calls", {"daily_calls": 2}, 3, 1),
    ("daily_tokens", {"daily_tokens": 5}, 3, 2),
])
def test_every_cap_is_a_reason(tmp_path: Path, cap: str, settings: dict[str, int], calls: int,
                               tokens_per_call: int) -> None:
    policy = make_policy(tmp_path, mode="full", deny_patterns=[], **settings)
    tokens: list[int] = []
    held: Sequence[int] = ()
    reasons = []
    for call in range(calls):
        tokens += [65 + call] * tokens_per_call
        # Per-request caps count one request; the others count calls from any request.
        request_id = "one" if cap.startswith("per_request") else f"r{call}"
        decision = ask(policy, tokens, [False] * len(tokens), held=held, request_id=request_id)
        reasons.append(decision.reason)
        held = decision.remote_view if decision.allowed else held
    assert reasons == ["ok", "ok", f"cap:{cap}"]


def test_only_new_tokens_count_against_token_caps(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, mode="full", deny_patterns=[], per_request_tokens=12)
    tokens = [65] * 10
    first = ask(policy, tokens, [False] * 10)
    second = ask(policy, [*tokens, 66, 67], [False] * 12, held=first.remote_view)
    third = ask(policy, [*tokens, 66, 67, 68], [False] * 13, held=second.remote_view)
    assert [first.reason, second.reason, third.reason] == ["ok", "ok", "cap:per_request_tokens"]


def test_dry_run_decides_but_never_sends_or_counts(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, dry_run=True, per_request_calls=1)
    tokens, mask = sequence(*PROMPT)
    for _ in range(3):
        decision = ask(policy, tokens, mask)
        assert (decision.allowed, decision.dry_run, decision.reason) == (False, True, "dry_run")
        assert "[private]" in text_of(decision.remote_view)


def test_dry_run_still_reports_caps(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, dry_run=True, per_request_tokens=3)
    tokens, mask = sequence(*PROMPT)
    decision = ask(policy, tokens, mask)
    assert (decision.allowed, decision.dry_run, decision.reason) == (
        False, True, "cap:per_request_tokens")


def test_caps_hold_for_eight_concurrent_requests(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, hourly_calls=20)
    tokens, mask = sequence(*PROMPT)

    def run(worker: int) -> list[str]:
        return [ask(policy, tokens, mask, request_id=f"r{worker}").reason for _ in range(10)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = [reason for batch in pool.map(run, range(8)) for reason in batch]
    assert reasons.count("ok") == 20
    assert reasons.count("cap:hourly_calls") == 60


def test_mask_of_the_wrong_length_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="private mask has 1 entries for 2 tokens"):
        ask(make_policy(tmp_path), [1, 2], [False])


def test_placeholder_must_tokenize(tmp_path: Path) -> None:
    class Silent(MergeTokenizer):
        def tokenize(self, text: str) -> list[int]:
            return []

    settings = PolicySettings(usage_db=tmp_path / "u.sqlite3")
    with pytest.raises(PolicyError, match="tokenizes to nothing"):
        Policy(settings, tokenizer=Silent(), usage=UsageStore(settings.usage_db))


def test_shipped_policy_toml_loads_and_matches_the_defaults() -> None:
    loaded = load_settings(PolicySettings, CONFIGS / "policy.toml")
    assert loaded.model_dump() == PolicySettings().model_dump()


def test_policy_settings_from_file_and_environment(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('mode = "window"\nwindow_tokens = 64\n'
                    '[[deny_patterns]]\nname = "x"\nregex = "secret"\naction = "skip"\n')
    monkeypatch.setenv("TANDEM_POLICY_DRY_RUN", "true")
    loaded = load_settings(PolicySettings, path)
    assert (loaded.mode, loaded.window_tokens, loaded.dry_run) == ("window", 64, True)
    assert [pattern.name for pattern in loaded.deny_patterns] == ["x"]


@pytest.mark.parametrize(("toml", "problem"), [
    ('mood = "full"\n', "mood"),
    ('mode = "everything"\n', "mode"),
    ("hourly_calls = -1\n", "hourly_calls"),
    ('[[deny_patterns]]\nname = "x"\nregex = "(unclosed"\n', "not a valid regular expression"),
    ('[[deny_patterns]]\nname = "x"\nregex = "a*"\n', "matches the empty string"),
    ('[[deny_patterns]]\nname = "x"\nregex = "a"\naction = "shout"\n', "action"),
])
def test_bad_policy_files_are_config_errors(tmp_path: Path, toml: str, problem: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(PolicySettings, path)


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    from tandem_core.base_model import LlamaModel, smollm2_path

    model = LlamaModel(smollm2_path(), n_ctx=512)
    yield model
    model.close()


@pytest.mark.parametrize("answer", [f" The IBAN is {IBAN}.", f" Send it to {IBAN.replace(' ', '')}"])
def test_iban_copy_with_a_real_bpe_vocabulary(tmp_path: Path, smollm2: Any, answer: str) -> None:
    """SmolLM2's BPE packs several digits or letters into one token; the bound still holds."""
    settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3")
    policy = Policy(settings, tokenizer=smollm2, usage=UsageStore(settings.usage_db))
    tokens, mask = list(smollm2.tokenize("", add_bos=True)), []
    for text, private in PROMPT:
        ids = smollm2.tokenize(text)
        tokens += ids
        mask += [private] * len(ids)
    mask = [False] * (len(tokens) - len(mask)) + mask
    answer_tokens = smollm2.tokenize(answer)
    held: Sequence[int] = ()
    for generated in range(len(answer_tokens) + 1):
        decision = ask(policy, tokens + answer_tokens[:generated], mask + [False] * generated,
                       held=held)
        view_text = smollm2.detokenize(decision.remote_view).decode("utf-8", "replace")
        assert _leaked_pieces(view_text, IBAN, 3) == [], (generated, view_text)
        held = decision.remote_view
    policy.close()
