"""Collection of switch-head training data: base hidden states and log-probs, expert log-probs.

For each corpus line ``{"prompt", "answer"}`` (or GSM8K's ``{"question", "answer"}``) the base
runs over prompt + answer in one batched llama.cpp decode, which yields the final hidden state
and logits at every position. At each answer position we keep the hidden state that predicts
the gold token, the base's log-prob of it, its argmax and two cheap features (entropy, top-1
margin). The expert's log-prob and argmax at the same positions come from the gateway's
``/v1/score``; that egress goes through the client's policy and audit like any other.

Output: safetensors shards (deterministic bytes, so an interrupted run resumed gives the same
files) plus ``manifest.json`` naming models, fingerprints, file hashes, the corpus hash and counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from client.decoding import authorize_egress
from client.egress import AuditSink, EgressOutcome, EgressPolicy, EgressRequest
from client.prompting import Segment, plain_prompt
from tandem_core.base_model import BaseModel
from tandem_core.errors import TandemError, TokenizerMismatchError

if TYPE_CHECKING:
    from client.composition import Egress, GatewayExpert, LocalExpert

ARRAY_NAMES = ("hidden", "features", "base_logprob", "expert_logprob", "base_argmax",
               "expert_argmax", "gold", "example_index", "answer_position")
MANIFEST_NAME = "manifest.json"
FORMAT = "tandem-collect/1"
PromptStyle = Literal["auto", "plain", "chat"]


class CollectError(TandemError):
    """Collection could not run: bad corpus, unusable model, or an expert that failed."""


# --- the stored data --------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectedData:
    """All answer positions of a collection, concatenated; one row per position."""

    hidden: np.ndarray  # [n, d] float32: the base's final hidden state that predicts gold
    features: np.ndarray  # [n, 2] float32: base entropy and top-1 margin at that position
    base_logprob: np.ndarray  # [n] float32: log P_base(gold)
    expert_logprob: np.ndarray  # [n] float32: log P_expert(gold)
    base_argmax: np.ndarray  # [n] int32
    expert_argmax: np.ndarray  # [n] int32
    gold: np.ndarray  # [n] int32
    example_index: np.ndarray  # [n] int32: corpus line of the position
    answer_position: np.ndarray  # [n] int32: index of the gold token within the answer
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[1])

    def select(self, mask: np.ndarray) -> CollectedData:
        arrays = {name: getattr(self, name)[mask] for name in ARRAY_NAMES}
        return CollectedData(**arrays, manifest=self.manifest)


def base_features(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) and top-1 margin (p1 - p2) of the base distribution, float32 [n, 2]."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    probs = np.exp(log_probs)
    entropy = -(probs * log_probs).sum(axis=-1)
    if probs.shape[1] > 1:
        top_two = np.partition(probs, probs.shape[1] - 2, axis=-1)[:, -2:]
    else:
        top_two = np.pad(probs, ((0, 0), (1, 0)))
    margin = top_two.max(axis=-1) - top_two.min(axis=-1)
    return np.stack([entropy, margin], axis=-1).astype(np.float32)


def load_collected(directory: Path) -> CollectedData:
    """Concatenate the shards named by a complete manifest."""
    manifest = read_manifest(directory)
    if not manifest.get("complete"):
        raise CollectError(f"collection in {directory} is incomplete; rerun `tandem train collect`")
    from safetensors.numpy import load_file

    shards = [load_file(str(directory / shard["name"])) for shard in manifest["shards"]]
    shards = [shard for shard in shards if shard["gold"].shape[0]]
    if not shards:
        raise CollectError(f"collection in {directory} holds no answer positions")
    arrays = {name: np.concatenate([shard[name] for shard in shards]) for name in ARRAY_NAMES}
    return CollectedData(**arrays, manifest=manifest)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CollectError(f"no {MANIFEST_NAME} in {directory}: run `tandem train collect` first") from exc
    except (OSError, ValueError) as exc:
        raise CollectError(f"cannot read {path}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CollectError(f"{path} is not a manifest written by `tandem train collect`")
    return manifest


# --- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    index: int
    prompt: str
    answer: str
    segments: tuple[Segment, ...] = ()  # the toy's passage/question, so private spans are known


def read_corpus(path: Path, *, limit: int | None = None) -> list[Example]:
    """``{"prompt","answer"}`` or ``{"question","answer"}`` lines; a clear error names a bad line."""
    examples: list[Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CollectError(f"cannot read corpus {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        examples.append(_example(len(examples), line, where=f"{path}:{number}"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise CollectError(f"corpus {path} holds no examples")
    return examples


def _example(index: int, line: str, *, where: str) -> Example:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise CollectError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise CollectError(f"{where}: expected a JSON object")
    prompt, answer = record.get("prompt", record.get("question")), record.get("answer")
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise CollectError(f"{where}: needs string fields 'prompt' (or 'question') and 'answer'")
    segments: tuple[Segment, ...] = ()
    passage, question = record.get("passage"), record.get("question")
    if "prompt" in record and isinstance(passage, str) and isinstance(question, str):
        segments = tuple(plain_prompt([passage], question))
        if "".join(segment.text for segment in segments) != prompt:
            segments = ()  # a prompt in another format: treat it as one public piece
    return Example(index, prompt, answer, segments)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- tokenization -------------------------------------------------------------------------------


def resolve_style(model: BaseModel, style: PromptStyle) -> Literal["plain", "chat"]:
    if style == "auto":
        return "chat" if model.chat_template else "plain"
    if style == "chat" and not model.chat_template:
        raise CollectError("prompt style 'chat' needs a base model with a chat template")
    return style


def render_chat(template: str, prompt: str) -> str:
    """The chat template applied to one user turn, ending where the assistant's answer starts."""
    import jinja2.sandbox

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(
        messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
        bos_token="", eos_token="",
    )


def prompt_segments(model: BaseModel, example: Example, style: Literal["plain", "chat"]) -> list[Segment]:
    """The prompt as the client builds it: the toy's segments, or the chat template's rendering."""
    if style == "chat":
        assert model.chat_template is not None
        return [Segment(render_chat(model.chat_template, example.prompt))]
    return list(example.segments or (Segment(example.prompt),))


def encode_example(model: BaseModel, example: Example,
                   style: Literal["plain", "chat"]) -> tuple[list[int], list[bool], int]:
    """Token ids of prompt + answer + EOS, their private mask, and where the answer starts.

    The prompt is tokenized by ``CoDecoder.encode`` itself, so training positions are exactly
    the positions the decoder will see.
    """
    from client.decoding import CoDecoder

    encoder = CoDecoder(base=model, switch=_NoSwitch(), expert=None)
    prompt_ids, private = encoder.encode(prompt_segments(model, example, style))
    answer_ids = [*model.tokenize(example.answer), model.eos_id]
    return [*prompt_ids, *answer_ids], [*private, *[False] * len(answer_ids)], len(prompt_ids)


class _NoSwitch:
    def score(self, hidden: np.ndarray) -> np.ndarray:
        return np.zeros(len(hidden), np.float32)


# --- the expert side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredSpan:
    logprobs: np.ndarray  # [answer tokens] float32
    argmax: np.ndarray  # [answer tokens] int32


@dataclass(frozen=True)
class ScoringItem:
    tokens: Sequence[int]
    start: int  # first answer token
    private: Sequence[bool]  # per token: may the policy keep it on the machine


class ExpertScorer(Protocol):
    """Log-prob and argmax of the expert at every answer position of each item."""

    def score(self, items: Sequence[ScoringItem]) -> list[ScoredSpan | None]:
        """None for an item the egress policy did not let reach the expert."""
        ...


class ScoringEndpoint(Protocol):
    """What answers ``/v1/score``: ``client.expert.HttpExpert`` or ``LocalScoring``."""

    destination: str
    model: str

    def score(self, sequences: Sequence[tuple[Sequence[int], int]]) -> Sequence[Any]: ...


@dataclass
class EgressCounter:
    remote_calls: int = 0
    tokens_sent: int = 0
    denied: int = 0


class AuditedScorer:
    """Scores through an endpoint after policy cleared each sequence and the audit recorded it.

    The policy may shorten or redact the prefix (the remote view); the answer tokens must reach
    the expert unchanged, and the expert is scored on exactly the view it was allowed to see.
    """

    def __init__(self, endpoint: ScoringEndpoint, *, policy: EgressPolicy | None = None,
                 audit: AuditSink | None = None,
                 detokenize: Callable[[Sequence[int]], str] | None = None) -> None:
        from client.egress import SendEverything

        self.endpoint = endpoint
        self.policy: EgressPolicy = policy or SendEverything()
        self.audit = audit
        self.detokenize = detokenize or (lambda tokens: "")
        self.counter = EgressCounter()
        self.session = f"collect-{uuid.uuid4().hex[:12]}"

    def score(self, items: Sequence[ScoringItem]) -> list[ScoredSpan | None]:
        cleared = [self._clear(item) for item in items]
        views = [view for view in cleared if view is not None]
        if not views:
            return [None] * len(items)
        started = time.perf_counter()
        try:
            results = list(self.endpoint.score([(view, start) for view, start, _ in views]))
        except TandemError as exc:
            self._record_outcomes(views, [], time.perf_counter() - started, error=str(exc))
            raise CollectError(f"expert scoring failed: {exc}") from exc
        self.counter.remote_calls += 1
        if len(results) != len(views):
            raise CollectError(f"expert answered {len(results)} results for {len(views)} sequences")
        spans = [ScoredSpan(np.asarray(r.logprobs, np.float32), np.asarray(r.argmax, np.int32))
                 for r in results]
        self._record_outcomes(views, spans, time.perf_counter() - started)
        answered = iter(spans)
        return [None if view is None else next(answered) for view in cleared]

    def _clear(self, item: ScoringItem) -> tuple[list[int], int, str | None] | None:
        """Ask policy for the remote view, write the audit record, return what may be sent."""
        request = EgressRequest(uuid.uuid4().hex, self.session, list(item.tokens),
                                list(item.private), ())  # no held view: each sequence whole
        decision, egress_id = authorize_egress(
            self.policy, self.audit, request, destination=self.endpoint.destination,
            model=self.endpoint.model, detokenize=self.detokenize)
        answer = list(item.tokens[item.start:])
        view = list(decision.remote_view)
        if not decision.allowed or len(view) <= len(answer) or view[len(view) - len(answer):] != answer:
            # Denied, or the policy hid part of the answer: there is nothing to learn from.
            self.counter.denied += 1
            return None
        self.counter.tokens_sent += len(view)
        return view, len(view) - len(answer), egress_id

    def _record_outcomes(self, views: Sequence[tuple[list[int], int, str | None]],
                         spans: Sequence[ScoredSpan], latency_s: float, *, error: str | None = None) -> None:
        if self.audit is None:
            return
        for index, (_, _, egress_id) in enumerate(views):
            if egress_id is None:
                continue
            received = spans[index].argmax.tolist() if index < len(spans) else []
            self.audit.record_outcome(egress_id, EgressOutcome(
                received_tokens=received, latency_s=latency_s, error=error))


class LocalScoring:
    """``/v1/score`` computed by an in-process llama.cpp expert: same answers, no HTTP."""

    def __init__(self, model: BaseModel, *, name: str = "local-expert") -> None:
        self.expert_model = model
        self.model = name
        self.destination = "in-process"

    def score(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[Any]:
        from tandem_core.continuation import score_sequence

        results = []
        for tokens, start in sequences:
            # From an empty cache in one decode call (the model batches it), so a shard's bytes
            # do not depend on which sequence was scored before.
            self.expert_model.reset()
            results.append(score_sequence(self.expert_model, tokens, start, chunk=len(tokens)))
        self.expert_model.reset()
        return results


# --- the collection loop --------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectPlan:
    corpus: Path
    out: Path
    limit: int | None = None
    shard_size: int = 64
    score_batch: int = 16
    prompt_style: PromptStyle = "auto"
    progress: bool = True


def collect(plan: CollectPlan, *, base: BaseModel, base_path: Path, scorer: ExpertScorer,
            expert_info: dict[str, Any], after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the collection into ``plan.out``; shards already written by an identical run are kept."""
    examples = read_corpus(plan.corpus, limit=plan.limit)
    style = resolve_style(base, plan.prompt_style)
    plan.out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(plan, base, base_path, expert_info, style, len(examples))
    run_key = _run_key(manifest)
    shards = list(_chunks(examples, plan.shard_size))
    from tqdm import tqdm

    for shard_number, chunk in enumerate(tqdm(shards, desc="collect shards", disable=not plan.progress)):
        path = plan.out / f"shard-{shard_number:05d}.safetensors"
        if not _shard_done(path, run_key):
            arrays, counts = _collect_chunk(chunk, base, scorer, style, plan.score_batch)
            _write_shard(path, arrays, run_key, counts)
        manifest["shards"].append(_shard_entry(path))
        if after_shard is not None:
            after_shard(shard_number)
    return _finish_manifest(plan.out, manifest, scorer)


def _chunks(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), size):
        yield list(examples[start:start + size])


def _start_manifest(plan: CollectPlan, base: BaseModel, base_path: Path, expert_info: dict[str, Any],
                    style: str, examples: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "complete": False,
        "corpus": {"path": str(plan.corpus), "sha256": file_sha256(plan.corpus), "examples": examples,
                   "limit": plan.limit},
        "base": {"path": str(base_path), "sha256": file_sha256(base_path),
                 "fingerprint": base.fingerprint, "hidden_size": base.hidden_size,
                 "vocab_size": base.vocab_size},
        "expert": expert_info,
        "prompt_style": style,
        "shard_size": plan.shard_size,
        "feature_names": ["entropy", "top1_margin"],
        "shards": [],
    }


def _run_key(manifest: dict[str, Any]) -> str:
    """What makes a shard reusable: same corpus, base, expert, style and sharding."""
    identity = {key: manifest[key] for key in ("corpus", "base", "expert", "prompt_style", "shard_size")}
    identity["base"] = {k: v for k, v in identity["base"].items() if k != "path"}
    identity["corpus"] = {k: v for k, v in identity["corpus"].items() if k != "path"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _shard_done(path: Path, run_key: str) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return bool(_shard_metadata(handle).get("run_key") == run_key)
    except Exception:  # a torn or foreign file: collect the shard again
        return False


def _collect_chunk(chunk: Sequence[Example], base: BaseModel, scorer: ExpertScorer,
                   style: Literal["plain", "chat"],
                   score_batch: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rows: list[dict[str, np.ndarray]] = []
    pending: list[tuple[Example, ScoringItem, dict[str, np.ndarray]]] = []
    skipped = denied = 0
    for example in chunk:
        tokens, private, start = encode_example(base, example, style)
        if len(tokens) > base.n_ctx:
            skipped += 1  # longer than the base's context: it could never be decoded either
            continue
        pending.append((example, ScoringItem(tokens, start, private), _base_pass(base, tokens, start)))
    for batch_start in range(0, len(pending), score_batch):
        batch = pending[batch_start:batch_start + score_batch]
        spans = scorer.score([item for _, item, _ in batch])
        for (example, _, row), span in zip(batch, spans, strict=True):
            if span is None:
                denied += 1
                continue
            if len(span.logprobs) != len(row["gold"]):
                raise CollectError(f"expert scored {len(span.logprobs)} answer tokens, "
                                   f"expected {len(row['gold'])}")
            rows.append({**row, "expert_logprob": span.logprobs, "expert_argmax": span.argmax,
                         "example_index": np.full(len(row["gold"]), example.index, np.int32)})
    return _stack(rows, base.hidden_size), {"skipped": skipped, "denied": denied}


def _base_pass(base: BaseModel, tokens: Sequence[int], start: int) -> dict[str, np.ndarray]:
    """One decode of everything but the last token: row i predicts token i + 1."""
    from tandem_core.protocol import log_softmax

    base.reset()
    output = base.decode(list(tokens[:-1]))
    base.reset()
    logits = np.asarray(output.logits[start - 1:], dtype=np.float32)
    gold = np.asarray(tokens[start:], dtype=np.int32)
    log_probs = log_softmax(logits.astype(np.float64))
    return {
        "hidden": np.ascontiguousarray(output.hidden[start - 1:], dtype=np.float32),
        "features": base_features(logits),
        "base_logprob": log_probs[np.arange(len(gold)), gold].astype(np.float32),
        "base_argmax": logits.argmax(axis=-1).astype(np.int32),
        "gold": gold,
        "answer_position": np.arange(len(gold), dtype=np.int32),
    }


def _stack(rows: list[dict[str, np.ndarray]], hidden_size: int) -> dict[str, np.ndarray]:
    if not rows:
        empty = {name: np.zeros(0, np.int32) for name in ARRAY_NAMES}
        empty.update(hidden=np.zeros((0, hidden_size), np.float32), features=np.zeros((0, 2), np.float32),
                     base_logprob=np.zeros(0, np.float32), expert_logprob=np.zeros(0, np.float32))
        return empty
    return {name: np.ascontiguousarray(np.concatenate([row[name] for row in rows])) for name in ARRAY_NAMES}


def _write_shard(path: Path, arrays: dict[str, np.ndarray], run_key: str, counts: dict[str, int]) -> None:
    """Write beside the target and rename, so an interrupted run never leaves a torn shard."""
    from safetensors.numpy import save_file

    partial = path.with_suffix(".partial")
    # One metadata entry: safetensors keeps metadata in a hash map, so several keys would be
    # written in a random order and identical shards would differ in bytes.
    metadata = {"tandem": json.dumps({"run_key": run_key, **counts}, sort_keys=True)}
    save_file(arrays, str(partial), metadata=metadata)
    partial.replace(path)


def _shard_entry(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        gold = handle.get_tensor("gold")
        examples = len(np.unique(handle.get_tensor("example_index")))
        metadata = _shard_metadata(handle)
    return {"name": path.name, "sha256": file_sha256(path), "examples": examples,
            "positions": int(gold.shape[0]), "skipped": int(metadata.get("skipped", 0)),
            "denied": int(metadata.get("denied", 0))}


def _shard_metadata(handle: Any) -> dict[str, Any]:
    try:
        metadata: dict[str, Any] = json.loads((handle.metadata() or {}).get("tandem", "{}"))
    except ValueError:
        return {}
    return metadata


def _finish_manifest(out: Path, manifest: dict[str, Any], scorer: ExpertScorer) -> dict[str, Any]:
    counter = getattr(scorer, "counter", EgressCounter())
    manifest["counts"] = {
        "examples": sum(shard["examples"] for shard in manifest["shards"]),
        "positions": sum(shard["positions"] for shard in manifest["shards"]),
        "skipped_too_long": sum(shard["skipped"] for shard in manifest["shards"]),
        "denied_by_policy": sum(shard["denied"] for shard in manifest["shards"]),
        "remote_calls_this_run": counter.remote_calls,
        "tokens_sent_this_run": counter.tokens_sent,
    }
    manifest["complete"] = True
    partial = out / (MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    partial.replace(out / MANIFEST_NAME)
    return manifest


# --- the command ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressSetup:
    """Where scoring egress is governed: a policy.toml (policy + its audit log) or just an audit log."""

    policy_file: Path | None = None
    audit_log: Path | None = None
    audit_key: Any = None  # a pydantic SecretStr; None: the audit-hmac secret


def egress_for(setup: EgressSetup, *, default_audit: Path) -> Egress:
    """The policy (None: send everything) and the audit log every expert call is written to.

    The audit HMAC key comes from the keyring (created on first use) or TANDEM_AUDIT_HMAC_KEY;
    ``setup.audit_key`` overrides both (the toy pipeline on loopback uses its own key).
    """
    from client.composition import Egress
    from client.secrets import SecretStore

    policy = None
    audit_path = setup.audit_log or default_audit
    if setup.policy_file is not None:
        from client.settings import PolicySettings
        from tandem_core.settings import load_settings

        policy = load_settings(PolicySettings, setup.policy_file)
        audit_path = setup.audit_log or policy.audit_log
    key = setup.audit_key or SecretStore().get_or_create("audit-hmac")
    return Egress(audit_path, key, policy)


def gateway_expert(url: str, *, model: str, timeout_s: float = 300.0) -> GatewayExpert:
    """The gateway at ``url``, with the gateway token when one is configured, two retries."""
    from client.composition import GatewayExpert
    from client.errors import SecretMissingError
    from client.secrets import SecretStore
    from client.settings import ExpertSettings

    try:
        token = SecretStore().get("gateway")
    except SecretMissingError:
        token = None  # a gateway without auth (local tests, a trusted network)
    return GatewayExpert(ExpertSettings(url=url, model=model, timeout_s=timeout_s, retries=2), token)


def run_collect(plan: CollectPlan, *, base_path: Path, gateway_url: str | None, expert_model: str,
                expert_gguf: Path | None = None, egress: EgressSetup | None = None,
                n_ctx: int = 4096, n_threads: int = 2,
                after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Open the base (and the gateway or an in-process expert) and collect into ``plan.out``."""
    from client.composition import LocalExpert, PartsSpec, open_parts
    from client.expert import HttpExpert
    from client.settings import BaseModelSettings

    if (gateway_url is None) == (expert_gguf is None):
        raise CollectError("give exactly one expert: a gateway URL or an expert GGUF (in-process)")
    expert: GatewayExpert | LocalExpert
    if gateway_url is not None:
        expert = gateway_expert(gateway_url, model=expert_model)
        info: dict[str, Any] = {"url": gateway_url, "model": expert_model}
    else:
        assert expert_gguf is not None
        expert = LocalExpert(expert_gguf, expert_model)
        info = {"url": "in-process", "model": expert_model, "sha256": file_sha256(expert_gguf)}
    spec = PartsSpec(base_path, expert,
                     egress_for(egress or EgressSetup(), default_audit=plan.out / "audit.jsonl"),
                     base=BaseModelSettings(n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                                            max_parallel=1))
    with contextlib.ExitStack() as stack:
        try:
            parts = open_parts(stack, spec)
        except TokenizerMismatchError as exc:
            raise CollectError(f"{exc} (token-level scoring needs one)") from exc
        endpoint: ScoringEndpoint
        if parts.expert_model is not None:
            endpoint = LocalScoring(parts.expert_model, name=expert_model)
        else:
            assert isinstance(parts.expert, HttpExpert)
            endpoint = parts.expert
        base = parts.base
        scorer = AuditedScorer(endpoint, policy=parts.policy, audit=parts.audit,
                               detokenize=lambda ids: base.detokenize(ids).decode("utf-8", "replace"))
        return collect(plan, base=base, base_path=base_path, scorer=scorer, expert_info=info,
                       after_shard=after_shard)
