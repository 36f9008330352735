"""Benchmark the expert gateway over real HTTP (uvicorn on 127.0.0.1).

1. /v1/continue latency at a 100-token and a 2000-token prefix within one session (each call
   adds one token; only it is prefilled: target ratio <= 1.3), and without sessions (every call
   resends the whole prefix with held = 0), for contrast; then the same session calls on the
   backend in-process, whose ratio is the model's own attention cost over the held context.
2. Throughput with 1, 4 and 16 concurrent sessions.

    python bench/bench_gateway.py                       # llama_cpp backend, toy expert or SmolLM2
    python bench/bench_gateway.py --backend hf          # random Llama (--hidden, --layers) on CUDA

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.daemon import ServerThread
from expert_gateway.app import create_app
from expert_gateway.backends.base import ContinueOptions, ExpertBackend
from expert_gateway.settings import GatewaySettings


@contextlib.contextmanager
def served(backend: ExpertBackend) -> Iterator[httpx.Client]:
    settings = GatewaySettings.model_validate({
        "auth": {"enabled": False, "keys_file": Path(tempfile.mkdtemp()) / "k.json"},
        "sessions": {"max_sessions": 1024}})
    server = ServerThread(create_app(settings, backend=backend))
    url = server.start(timeout=120)
    limits = httpx.Limits(max_connections=64)
    with httpx.Client(base_url=url, timeout=300, limits=limits) as client:
        yield client
    server.stop()


def _tokens(count: int, vocab_size: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(token) for token in rng.integers(3, min(vocab_size, 5000), size=count)]


def _post(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/continue", json=body)
    response.raise_for_status()
    return dict(response.json())


def interleaved(calls: int, short: Callable[[int], None], long: Callable[[int], None]) -> tuple[float, float]:
    """Median seconds of ``short(i)`` and of ``long(i)``, alternated call by call.

    Alternating makes drifting machine load hit both sides alike, so their ratio stays honest
    on a shared machine; round 0 is an untimed warm-up.
    """
    timings: tuple[list[float], list[float]] = ([], [])
    for index in range(calls + 1):
        for side, call in zip(timings, (short, long), strict=True):
            started = time.perf_counter()
            call(index)
            if index:
                side.append(time.perf_counter() - started)
    return statistics.median(timings[0]), statistics.median(timings[1])


def http_call(client: httpx.Client, info: dict[str, Any], *, prefix: int,
              sessions: bool) -> Callable[[int], None]:
    """One /v1/continue call at about ``prefix`` tokens that adds one token and asks for one.

    With sessions it extends one session; without, it sends a fresh whole prefix (held = 0) that
    no cache, session or slot content, can serve any of.
    """
    base = {"model": info["name"], "tokenizer": info["tokenizer"], "max_tokens": 1}
    session = f"lat-{prefix}-{sessions}"
    held = [0]
    if sessions:
        prompt = _tokens(prefix, info["vocab_size"], seed=prefix)
        held[0] = _post(client, {**base, "session": session, "held": 0, "tokens": prompt})["held"]

    def call(index: int) -> None:
        if sessions:
            body = {**base, "session": session, "held": held[0],
                    "tokens": _tokens(1, info["vocab_size"], seed=1000 + index)}
            held[0] = _post(client, body)["held"]
        else:
            fresh = _tokens(prefix, info["vocab_size"], seed=prefix * 1000 + index)
            _post(client, {**base, "session": f"{session}-{index}", "held": 0, "tokens": fresh})

    return call


def engine_call(backend: ExpertBackend, *, prefix: int) -> Callable[[int], None]:
    """The same one-token session extension as ``http_call``, on the backend in-process.

    Its 100 -> 2000 ratio is the model's own cost of attending over the held context: what the
    gateway cannot remove by reusing the cache.
    """
    options = ContinueOptions(max_tokens=1)
    sequence = _tokens(prefix, backend.info.vocab_size, seed=prefix)
    session = f"engine-{prefix}"
    sequence += backend.continue_(session, sequence, options=options).tokens

    def call(index: int) -> None:
        sequence.extend(_tokens(1, backend.info.vocab_size, seed=1000 + index))
        sequence.extend(backend.continue_(session, sequence, options=options).tokens)

    return call


def throughput(client: httpx.Client, info: dict[str, Any], *, sessions: int, calls: int,
               max_tokens: int, new_tokens: int) -> dict[str, float]:
    base = {"model": info["name"], "tokenizer": info["tokenizer"], "max_tokens": max_tokens}

    def one_session(index: int) -> int:
        held = _post(client, {**base, "session": f"tp{sessions}-{index}", "held": 0,
                              "tokens": _tokens(32, info["vocab_size"], seed=index)})["held"]
        produced = 0
        for call in range(calls):
            reply = _post(client, {**base, "session": f"tp{sessions}-{index}", "held": held,
                                   "tokens": _tokens(new_tokens, info["vocab_size"], seed=call)})
            held, produced = reply["held"], produced + len(reply["tokens"])
        return produced

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        produced = sum(pool.map(one_session, range(sessions)))
    elapsed = time.perf_counter() - started
    return {"sessions": sessions, "requests_per_s": sessions * (calls + 1) / elapsed,
            "tokens_per_s": produced / elapsed, "seconds": elapsed}


def llama_cpp_backends(model: Path | None, threads: int) -> tuple[ExpertBackend, ExpertBackend, str]:
    from expert_gateway.backends.llama_cpp import LlamaCppBackend

    path, label = _default_model() if model is None else (model, model.name)
    long_context = LlamaCppBackend.open(path, name="bench", n_ctx=3 * 2560, n_batch=512,
                                        n_threads=threads, slots=2)
    many_sessions = LlamaCppBackend.open(path, name="bench", n_ctx=17 * 256, n_batch=256,
                                         n_threads=threads, slots=16)
    return long_context, many_sessions, label


def _default_model() -> tuple[Path, str]:
    with contextlib.suppress(ImportError):
        from export.toy import ToyPair, code_hash, default_cache_dir

        root = default_cache_dir() / code_hash()
        if (root / "report.json").exists():
            return Path(ToyPair.at(root).expert_gguf), "toy expert"
    from client.base_model import smollm2_path

    return smollm2_path(), "SmolLM2-135M-Instruct Q4_1"


def hf_backend(hidden: int, layers: int, max_batch: int,
               batch_prefill_tokens: int) -> tuple[ExpertBackend, str]:
    """A randomly initialised Llama of the given shape, built straight on the device.

    Random weights cost the same FLOPs and bytes as trained ones; built on the GPU in bf16 it
    skips a multi-GB save and load.
    """
    import torch
    import transformers

    from expert_gateway.backends.hf import HfBackend

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 3,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=max(1, hidden // 256),
                                      max_position_embeddings=4096)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e9
    backend = HfBackend(model, name="bench", fingerprint="ab" * 32, vocab_size=config.vocab_size,
                        eos_ids=frozenset(), max_batch=max_batch, max_context=4096,
                        batch_prefill_tokens=batch_prefill_tokens)
    return backend, (f"random Llama {layers}x{hidden} ({parameters:.2f} B params, {dtype}, max batch "
                     f"{max_batch}, batched prefill <= {batch_prefill_tokens} tokens) on {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["llama_cpp", "hf"], default="llama_cpp")
    parser.add_argument("--model", type=Path, help="GGUF for llama_cpp (default: toy expert or SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=8, help="timed calls per measurement")
    parser.add_argument("--hidden", type=int, default=1024, help="hf: hidden size of the random model")
    parser.add_argument("--layers", type=int, default=8, help="hf: layers of the random model")
    parser.add_argument("--max-batch", type=int, default=64, help="hf: sessions per batched decode step")
    parser.add_argument("--batch-prefill-tokens", type=int, default=64,
                        help="hf: calls with at most this many new tokens join the batched step (0: none)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--span", type=int, default=4, help="max_tokens per call in the throughput runs")
    parser.add_argument("--new-tokens", type=int, default=4,
                        help="tokens each throughput call adds (the base's tokens since the last call)")
    args = parser.parse_args()

    results: dict[str, Any] = {"backend": args.backend}
    if args.backend == "llama_cpp":
        long_context, many, label = llama_cpp_backends(args.model, args.threads)
    else:
        long_context, label = hf_backend(args.hidden, args.layers, args.max_batch,
                                         args.batch_prefill_tokens)
        many = long_context
    results["model"] = label
    rows = []
    with served(long_context) as client:
        info = client.get("/v1/models").json()[0]
        for sessions in (True, False):
            short, long = interleaved(args.calls, http_call(client, info, prefix=100, sessions=sessions),
                                      http_call(client, info, prefix=2000, sessions=sessions))
            key = "with_sessions" if sessions else "without_sessions"
            results[key] = {"p100_ms": short * 1e3, "p2000_ms": long * 1e3, "ratio": long / short}
            rows.append((f"latency {key.replace('_', ' ')}", f"{short * 1e3:.1f} ms @100",
                         f"{long * 1e3:.1f} ms @2000", f"ratio {long / short:.2f}"))
    short, long = interleaved(args.calls, engine_call(long_context, prefix=100),
                              engine_call(long_context, prefix=2000))
    results["engine_with_sessions"] = {"p100_ms": short * 1e3, "p2000_ms": long * 1e3, "ratio": long / short}
    rows.append(("engine alone (no HTTP)", f"{short * 1e3:.1f} ms @100", f"{long * 1e3:.1f} ms @2000",
                 f"ratio {long / short:.2f}"))
    if many is not long_context:
        long_context.close()
    with served(many) as client:
        info = client.get("/v1/models").json()[0]
        results["throughput"] = []
        for count in (int(value) for value in args.concurrency.split(",")):
            steps = getattr(many, "steps", None)  # the hf backend's batch size per decode step
            if steps is not None:
                steps.clear()
            measured = throughput(client, info, sessions=count, calls=args.calls, max_tokens=args.span,
                                  new_tokens=args.new_tokens)
            if steps:
                measured["mean_decode_batch"] = statistics.fmean(steps)
            results["throughput"].append(measured)
            batch = f" (batch {measured['mean_decode_batch']:.1f})" if steps else ""
            rows.append((f"throughput {count} sessions{batch}", f"{measured['requests_per_s']:.1f} req/s",
                         f"{measured['tokens_per_s']:.1f} tok/s", f"{measured['seconds']:.1f} s"))
    many.close()
    print(f"model: {label}")
    for row in rows:
        print(f"{row[0]:<32} {row[1]:>16} {row[2]:>18} {row[3]:>14}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
