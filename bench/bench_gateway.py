"""Benchmark the expert gateway over real HTTP (uvicorn on 127.0.0.1).

1. /v1/continue latency at a 100-token and a 2000-token prefix within one session (each call
   adds one token; only it is prefilled: target ratio <= 1.3, <= 1.1 for hf), and without
   sessions (every call resends the whole prefix with held = 0), for contrast; then the same
   session calls on the backend in-process, whose ratio is the model's own attention cost.
2. Throughput with 1, 4 and 16 concurrent sessions (hf: 1, 8 and 32). The load runs in child
   processes (one per two cores, at most 8), as remote clients would: a client sharing the
   server's interpreter lock, or a single client process, would measure itself. hf: the mean
   batch of the decode steps, the scheduler's ms per loop, launching and waiting, the GPU's own
   ms per step (CUDA events) and its busy share, and a call's ms in the engine against the
   clients' round trip (what HTTP, the gateway and the pipe add to each call).
3. hf only: plain transformers ``generate`` on the same model in the same process (batch 32 and
   1, 64-token prompts, 64 new tokens), the gateway's tok/s as a ratio to it, and the greedy
   agreement of the gateway's spans with uncached forward passes of the model.
   The engine runs in its own process (``--engine thread``: in the gateway's);
   ``--compare-thread`` also runs the 32-session load with the engine in the gateway's process;
   ``--kernel-checks`` gives greedy agreement and step times for each attention kernel.

    python bench/bench_gateway.py                       # llama_cpp backend, toy expert or SmolLM2
    python bench/bench_gateway.py --backend hf          # random Llama (--hidden, --layers) on CUDA
    python bench/bench_gateway.py --backend hf --hidden 2048 --layers 24 --span 8 --calls 24

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from expert_gateway.app import create_app
from expert_gateway.backends.base import ContinueOptions, ExpertBackend
from expert_gateway.settings import GatewaySettings
from tandem_core.server import ServerThread


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
               max_tokens: int, new_tokens: int, tag: str = "", processes: int = 0) -> dict[str, float]:
    """``sessions`` concurrent sessions of ``calls + 1`` calls each, driven from child processes.

    The sessions are spread over ``processes`` clients (0: one per two CPU cores, at most 8),
    which start together: one httpx client spends several times the gateway's CPU per request,
    so a single client process measured itself, not the gateway (on an H200 host, 32 sessions
    from one process reached 264 requests/s whatever the engine did).
    """
    if processes <= 0:
        processes = max(1, min(8, (os.cpu_count() or 2) // 2))
    processes = min(processes, sessions)
    specs = [{"url": str(client.base_url), "info": info, "sessions": sessions, "calls": calls,
              "max_tokens": max_tokens, "new_tokens": new_tokens, "tag": tag,
              "indices": list(range(part, sessions, processes))} for part in range(processes)]
    children = [subprocess.Popen([sys.executable, __file__, "--load", json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for spec in specs]
    for child in children:  # each has imported and connected: start them together
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a load process failed to start")
    started = time.time()
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    parts = []
    for child in children:
        out, _ = child.communicate(timeout=1800)
        if child.returncode:
            raise RuntimeError(f"a load process failed with exit code {child.returncode}")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = max(part["ended"] for part in parts) - started
    requests = sum(part["requests"] for part in parts)
    return {"sessions": sessions, "requests_per_s": requests / elapsed,
            "tokens_per_s": sum(part["produced"] for part in parts) / elapsed, "seconds": elapsed,
            "client_processes": processes,
            # a session's calls are sequential: the share of the run it had a call out
            "busy_share": sum(part["round_trip_s"] for part in parts) / (sessions * elapsed),
            "round_trip_ms": sum(part["round_trip_s"] for part in parts) * 1e3 / requests}


async def _load(spec: dict[str, Any]) -> dict[str, float]:
    """One client process of the throughput load: one asyncio task per session it drives."""
    info, sessions, calls, indices = spec["info"], spec["sessions"], spec["calls"], spec["indices"]
    base = {"model": info["name"], "tokenizer": info["tokenizer"], "max_tokens": spec["max_tokens"]}
    prefix = f"tp{spec['tag']}{sessions}"
    limits = httpx.Limits(max_connections=len(indices) + 4, max_keepalive_connections=len(indices) + 4)
    async with httpx.AsyncClient(base_url=spec["url"], timeout=300, limits=limits) as client:

        waited = [0.0]

        async def post(body: dict[str, Any]) -> dict[str, Any]:
            started = time.perf_counter()
            response = await client.post("/v1/continue", json=body)
            response.raise_for_status()
            waited[0] += time.perf_counter() - started
            return dict(response.json())

        async def one_session(index: int) -> int:
            reply = await post({**base, "session": f"{prefix}-{index}", "held": 0,
                                "tokens": _tokens(32, info["vocab_size"], seed=index)})
            held, produced = reply["held"], len(reply["tokens"])
            for call in range(calls):
                reply = await post({**base, "session": f"{prefix}-{index}", "held": held,
                                    "tokens": _tokens(spec["new_tokens"], info["vocab_size"], seed=call)})
                held, produced = reply["held"], produced + len(reply["tokens"])
            return produced

        await client.get("/health")  # connect before the clock starts
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the parent's "go"
        produced = sum(await asyncio.gather(*(one_session(index) for index in indices)))
    return {"requests": len(indices) * (calls + 1), "produced": produced, "ended": time.time(),
            "round_trip_s": waited[0]}


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
    from tandem_core.base_model import smollm2_path

    return smollm2_path(), "SmolLM2-135M-Instruct Q4_1"


def random_llama(hidden: int, layers: int) -> tuple[Any, str]:
    """A randomly initialised Llama of the given shape, built straight on the device.

    Random weights cost the same FLOPs and bytes as trained ones; built on the GPU in bf16 it
    skips a multi-GB save and load.
    """
    import torch
    import transformers

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
    return model, f"random Llama {layers}x{hidden} ({parameters:.2f} B params, {dtype}) on {name}"


def hf_backend(model: Any, max_batch: int, batch_prefill_tokens: int, slots: int,
               compile_blocks: bool = False) -> Any:
    from expert_gateway.backends.hf import HfBackend

    return HfBackend(model, name="bench", fingerprint="ab" * 32, vocab_size=model.config.vocab_size,
                     eos_ids=frozenset(), max_batch=max_batch, max_context=4096, slots=slots,
                     batch_prefill_tokens=batch_prefill_tokens, compile_blocks=compile_blocks)


def hf_engine(hidden: int, layers: int, max_batch: int, batch_prefill_tokens: int, slots: int,
              compile_blocks: bool) -> Any:
    """The engine process's backend: the same random model (same seed), built in the child."""
    model, _ = random_llama(hidden, layers)
    return hf_backend(model, max_batch, batch_prefill_tokens, slots, compile_blocks)


def plain_generate(model: Any, *, batch: int, prompt: int = 64, new: int = 64) -> float:
    """tok/s of transformers' own ``generate`` (greedy, static batch), the issue's anchor."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([_tokens(prompt, model.config.vocab_size, seed=row) for row in range(batch)],
                       device=device)
    mask = torch.ones_like(ids)

    def run(count: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=count,
                                 min_new_tokens=count, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt + count
        return time.perf_counter() - started

    run(4)  # warm-up
    return batch * new / min(run(new) for _ in range(2))


def greedy_agreement(backend: ExpertBackend, model: Any, *, prompts: int = 32, prompt: int = 96,
                     span: int = 16, tag: str = "") -> dict[str, float]:
    """How often the gateway's greedy tokens are the argmax of an uncached forward pass.

    Each span is checked token by token against one forward pass over prompt + span (the
    gateway's own tokens as the prefix), so a disagreement is counted where it happens. Its
    size is the reference's logit gap between its argmax and the gateway's token, also in units
    of the bf16 spacing at that logit: a gap of a unit or two is a genuine near-tie.
    """
    import torch

    device = next(model.parameters()).device
    options = ContinueOptions(max_tokens=span)
    sequences = []
    for index in range(prompts):
        tokens = _tokens(prompt, backend.info.vocab_size, seed=50_000 + index)
        sequences.append(tokens + backend.continue_(f"agree{tag}-{index}", tokens, options=options).tokens)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor(sequences, device=device)).logits.float()
    reference = logits[:, prompt - 1:-1]  # the distribution before each generated token
    chosen = torch.tensor([sequence[prompt:] for sequence in sequences], device=device)
    agree = reference.argmax(-1) == chosen
    best = reference.max(-1).values
    gaps = (best - reference.gather(-1, chosen[..., None])[..., 0])[~agree]
    spacing = torch.exp2(torch.floor(torch.log2(best.abs().clamp_min(1e-6))) - 7)[~agree]
    units = (gaps / spacing).tolist()
    spans = [bool(row.all()) for row in agree]
    # transformers' own cached greedy decoding, checked the same way: the rate at which plain
    # bf16 inference of this model departs from uncached passes by itself.
    with torch.inference_mode():
        prompts_tensor = torch.tensor([sequence[:prompt] for sequence in sequences], device=device)
        own = model.generate(input_ids=prompts_tensor, attention_mask=torch.ones_like(prompts_tensor),
                             max_new_tokens=span, min_new_tokens=span, do_sample=False, pad_token_id=0)
        own_logits = model(input_ids=own).logits.float()[:, prompt - 1:-1]
    own_agree = float((own_logits.argmax(-1) == own[:, prompt:]).float().mean())
    return {"tokens": agree.numel(), "token_agreement": float(agree.float().mean()),
            "hf_generate_token_agreement": own_agree,
            "span_agreement": sum(spans) / len(spans),
            "disagreements": len(units), "max_gap": float(gaps.max()) if len(units) else 0.0,
            "max_gap_bf16_units": max(units, default=0.0),
            "near_ties_within_2_units": sum(unit <= 2 for unit in units)}


def step_kernels(engine: Any, rows: list[tuple[str, str, str, str]]) -> dict[str, dict[str, float]]:
    """Milliseconds of one replayed step per attention kernel, batch and key length."""
    chosen, compiled = engine.attention_candidates, engine.compiled
    timings: dict[str, dict[str, float]] = {}
    variants = [(kernel, True) for kernel in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION",
                                              "EFFICIENT_SPLIT_KEYS", "TRITON_DECODE")]
    for kernel, blocks_compiled in variants:
        label = f"{kernel.lower()}{', compiled' if blocks_compiled else ''}"
        try:
            engine.compile_blocks(blocks_compiled)
            if engine.compiled != blocks_compiled:
                raise RuntimeError("torch.compile failed (see the warning)")
            # the split applies to batch 1 only: other shapes take the plain kernel
            engine.attention_candidates = (kernel, "EFFICIENT_ATTENTION") if "SPLIT" in kernel else (kernel,)
            engine.reset_graphs()
            timings[label] = {
                f"b{batch}_w{width}_t{length}": engine.replay_ms(batch, width, length)
                for batch, width, length in ((1, 2, 128), (1, 2, 2048), (32, 1, 128), (32, 6, 512),
                                             (32, 1, 2048), (64, 1, 128))}
        except Exception as exc:  # a kernel that cannot take this step is a finding, not a crash
            rows.append((f"step ms, {label}", "failed", type(exc).__name__, ""))
            print(f"step ms, {label}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
            continue
        cells = [f"{key}={value:.2f}" for key, value in timings[label].items()]
        print(f"step ms, {label}: {', '.join(cells)}", file=sys.stderr, flush=True)
        rows.append((f"step ms, {label}", ", ".join(cells[:2]), ", ".join(cells[2:4]),
                     ", ".join(cells[4:])))
    engine.compile_blocks(compiled)
    engine.attention_candidates = chosen
    engine.reset_graphs()
    try:  # where a replayed step spends its time, by kernel (stderr, for the notes)
        import torch

        # 32,1,128: a full decode step; 1,2,128 and 1,2,2048: the latency calls at 100 and 2,000
        # held tokens, whose difference is what the @2000 / @100 ratio still pays for
        for shape in ((32, 1, 128), (1, 2, 128), (1, 2, 2048)):
            engine.replay_ms(*shape, repeats=3)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                engine.replay_ms(*shape, repeats=10)
            print(f"profile of 10 replays of step {shape} (batch, width, keys), "
                  f"{engine.kernel_choice.get(shape)}:", file=sys.stderr)
            print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=25), file=sys.stderr)
    except Exception as exc:
        print(f"profile failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
    return timings


class Rows(list[tuple[str, str, str, str]]):
    """The table's rows, each also printed to stderr as it comes (a cut-off run keeps them)."""

    def append(self, row: tuple[str, str, str, str]) -> None:
        super().append(row)
        print(f"{row[0]:<40} {row[1]:>16} {row[2]:>18} {row[3]:>14}", file=sys.stderr, flush=True)


def run_throughput(backend: Any, concurrency: str, args: argparse.Namespace,
                   rows: list[tuple[str, str, str, str]], label: str = "") -> list[dict[str, float]]:
    """The throughput runs over HTTP, each after an untimed warm-up run; mean decode batch (hf)."""
    stats = getattr(backend, "stats", None)  # the hf backends' step history
    measured_runs = []
    with served(backend) as client:
        info = client.get("/v1/models").json()[0]
        runs = [(int(count), int(clients)) for count in concurrency.split(",")
                for clients in str(args.clients).split(",")]
        for index, (count, clients) in enumerate(runs):
            tag = f"{label.replace(' ', '')}{index}"
            throughput(client, info, sessions=count, calls=2, max_tokens=args.span,
                       new_tokens=args.new_tokens, tag="warm" + tag, processes=clients)
            if stats is not None:
                stats(clear=True)
            measured = throughput(client, info, sessions=count, calls=args.calls, max_tokens=args.span,
                                  new_tokens=args.new_tokens, tag=tag, processes=clients)
            found = stats() if stats is not None else {}
            steps = found.get("steps", [])
            if steps:
                measured["mean_decode_batch"] = statistics.fmean(steps)
                timing = found["timing"]
                if timing["loops"]:  # the scheduler: ms per stepping loop, and inside engine.step
                    measured["loop_ms"] = timing["loop_s"] * 1e3 / timing["loops"]
                    measured["launch_ms"] = timing["engine_s"] * 1e3 / len(steps)
                    measured["wait_ms"] = timing.get("wait_s", 0.0) * 1e3 / len(steps)
                    measured["mean_width"] = statistics.fmean(found["widths"])
                    measured["gpu_ms"] = timing.get("gpu_s", 0.0) * 1e3 / len(steps)
                    measured["gpu_busy"] = timing.get("gpu_s", 0.0) / max(timing["loop_s"], 1e-9)
                    if timing.get("calls"):
                        measured["engine_call_ms"] = timing["call_s"] * 1e3 / timing["calls"]
                    print(f"  scheduler at {count} sessions: {measured['loop_ms']:.2f} ms per loop, "
                          f"{measured['launch_ms']:.2f} ms launching a step, {measured['wait_ms']:.2f} ms "
                          f"waiting for one, {measured['gpu_ms']:.2f} ms of GPU per step "
                          f"(busy {measured['gpu_busy']:.0%} of the loops), mean width "
                          f"{measured['mean_width']:.1f}; a call {measured.get('engine_call_ms', 0):.2f} ms "
                          f"in the engine of {measured['round_trip_ms']:.2f} ms round trip, sessions "
                          f"busy {measured['busy_share']:.0%}", file=sys.stderr, flush=True)
            measured_runs.append(measured)
            batch = f" (batch {measured['mean_decode_batch']:.1f})" if steps else ""
            batch += f", {measured['client_processes']} clients" if measured["client_processes"] > 1 else ""
            rows.append((f"throughput {count} sessions{label}{batch}",
                         f"{measured['requests_per_s']:.1f} req/s", f"{measured['tokens_per_s']:.1f} tok/s",
                         f"{measured['seconds']:.1f} s"))
    return measured_runs


def kernel_agreement(local: Any, model: Any, rows: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """Greedy agreement with uncached passes for each attention kernel forced alone (in-process)."""
    engine = local.engine
    chosen = engine.attention_candidates
    found: dict[str, Any] = {}
    for kernel in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "TRITON_DECODE"):
        engine.attention_candidates = (kernel,)
        local.submit_call(engine.reset_graphs).result()
        try:
            short = greedy_agreement(local, model, tag=f"{kernel}-96")
            long = greedy_agreement(local, model, prompts=8, prompt=1900, tag=f"{kernel}-1900")
        except Exception as exc:
            rows.append((f"agreement, {kernel.lower()}", "failed", type(exc).__name__, ""))
            print(f"agreement {kernel}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
            continue
        found[kernel] = {"prompt_96": short, "prompt_1900": long}
        rows.append((f"agreement, {kernel.lower()}", f"{short['token_agreement']:.4f} @96",
                     f"{long['token_agreement']:.4f} @1900",
                     f"max gap {max(short['max_gap_bf16_units'], long['max_gap_bf16_units']):.1f} ulp"))
    engine.attention_candidates = chosen
    local.submit_call(engine.reset_graphs).result()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["llama_cpp", "hf"], default="llama_cpp")
    parser.add_argument("--model", type=Path, help="GGUF for llama_cpp (default: toy expert or SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=8, help="timed calls per measurement")
    parser.add_argument("--hidden", type=int, default=1024, help="hf: hidden size of the random model")
    parser.add_argument("--layers", type=int, default=8, help="hf: layers of the random model")
    parser.add_argument("--max-batch", type=int, default=64, help="hf: sessions per batched decode step")
    parser.add_argument("--slots", type=int, default=128, help="hf: KV slots of 4096 tokens")
    parser.add_argument("--batch-prefill-tokens", type=int, default=64,
                        help="hf: calls with at most this many new tokens join the batched step")
    parser.add_argument("--engine", choices=["process", "thread"], default="process",
                        help="hf: the engine in its own process (hf.engine_process) or in the gateway's")
    parser.add_argument("--eager-blocks", action="store_true",
                        help="hf: layer blocks run eagerly (default: torch.compile'd, as hf.compile_blocks)")
    parser.add_argument("--compare-thread", action="store_true",
                        help="hf: also run the largest load with the engine in the gateway's process")
    parser.add_argument("--kernel-checks", action="store_true",
                        help="hf: greedy agreement and step times for each attention kernel")
    parser.add_argument("--concurrency", default=None, help="sessions per throughput run "
                        "(default 1,4,16; hf 1,8,32)")
    parser.add_argument("--span", type=int, default=4, help="max_tokens per call in the throughput runs")
    parser.add_argument("--new-tokens", type=int, default=4,
                        help="tokens each throughput call adds (the base's tokens since the last call)")
    parser.add_argument("--clients", default="0",
                        help="client processes of a throughput run (0: one per two cores, at most 8); "
                             "a comma list runs each concurrency with each")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # child process of a throughput run
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(_load(json.loads(args.load)))))
        return 0

    results: dict[str, Any] = {"backend": args.backend}
    rows: list[tuple[str, str, str, str]] = Rows()
    model = None
    backend: Any
    if args.backend == "llama_cpp":
        long_context, many, label = llama_cpp_backends(args.model, args.threads)
        concurrency = args.concurrency or "1,4,16"
    else:
        from expert_gateway.backends.hf_process import ProcessBackend

        model, label = random_llama(args.hidden, args.layers)  # the anchors' and the checks' copy
        started = time.perf_counter()
        if args.engine == "process":
            backend = ProcessBackend(functools.partial(
                hf_engine, args.hidden, args.layers, args.max_batch, args.batch_prefill_tokens,
                args.slots, not args.eager_blocks))
        else:
            backend = hf_backend(model, args.max_batch, args.batch_prefill_tokens, args.slots,
                                 not args.eager_blocks)
        # Longer steps (the 2,000-token latency calls) are captured on first use, in the untimed
        # first round of those calls.
        graphs = backend.warmup(max_length=512)
        choice = backend.stats()["kernel_choice"]
        picked = {name: sum(value == name for value in choice.values()) for name in set(choice.values())}
        results["graphs"] = {"captured": graphs, "seconds": time.perf_counter() - started,
                             "attention_picked": picked, "engine": args.engine,
                             "compiled_blocks": not args.eager_blocks,
                             }
        rows.append((f"start + CUDA graphs ({args.engine})", f"{graphs}",
                     f"{time.perf_counter() - started:.1f} s",
                     " ".join(f"{name[:4]}={count}" for name, count in sorted(picked.items()))))
        long_context = many = backend
        concurrency = args.concurrency or "1,8,32"
    results["model"] = label
    with served(long_context) as client:
        info = client.get("/v1/models").json()[0]
        for sessions in (True, False):
            short, long = interleaved(args.calls, http_call(client, info, prefix=100, sessions=sessions),
                                      http_call(client, info, prefix=2000, sessions=sessions))
            key = "with_sessions" if sessions else "without_sessions"
            results[key] = {"p100_ms": short * 1e3, "p2000_ms": long * 1e3, "ratio": long / short}
            rows.append((f"latency {key.replace('_', ' ')}", f"{short * 1e3:.1f} ms @100",
                         f"{long * 1e3:.1f} ms @2000", f"ratio {long / short:.2f}"))
    if "graphs" in results:  # now the 2,000-key steps are captured too
        choice = long_context.stats()["kernel_choice"]  # type: ignore[attr-defined]
        # (batch, width, keys): a latency call feeds 2 tokens (the last one generated, and its own)
        results["graphs"]["picked_at"] = {key: choice.get(key) for key in (
            "1,2,128", "1,2,2048", "32,1,512", "32,8,512", "64,8,512")}
        shown = [f"{key}: {choice.get(key)}" for key in ("1,2,128", "1,2,2048", "32,8,512")]
        rows.append(("attention picked", shown[0], shown[1], shown[2]))
    short, long = interleaved(args.calls, engine_call(long_context, prefix=100),
                              engine_call(long_context, prefix=2000))
    results["engine_with_sessions"] = {"p100_ms": short * 1e3, "p2000_ms": long * 1e3, "ratio": long / short}
    rows.append(("engine alone (no HTTP)", f"{short * 1e3:.1f} ms @100", f"{long * 1e3:.1f} ms @2000",
                 f"ratio {long / short:.2f}"))
    if many is not long_context:
        long_context.close()
    results["throughput"] = run_throughput(many, concurrency, args, rows)
    if model is not None:
        agreement = greedy_agreement(many, model)
        results["greedy_agreement"] = agreement
        rows.append(("greedy agreement vs uncached forward", f"{agreement['token_agreement']:.4f} tokens",
                     f"{agreement['span_agreement']:.3f} spans",
                     f"max gap {agreement['max_gap_bf16_units']:.1f} ulp"))
        rows.append(("  transformers generate, same check", "",
                     f"{agreement['hf_generate_token_agreement']:.4f} tokens", ""))
    many.close()
    if model is not None:
        anchors = {batch: plain_generate(model, batch=batch) for batch in (32, 1)}
        results["plain_generate_tokens_per_s"] = anchors
        by_sessions = {run["sessions"]: run["tokens_per_s"] for run in results["throughput"]}
        ratios = {f"{sessions}_sessions_vs_generate_batch_{batch}": by_sessions[sessions] / anchors[batch]
                  for sessions, batch in ((32, 32), (1, 1)) if sessions in by_sessions}
        results["ratios"] = ratios
        for size, rate in anchors.items():
            rows.append((f"plain generate batch {size}", "", f"{rate:.1f} tok/s", ""))
        for name, ratio in ratios.items():
            rows.append((f"ratio {name.replace('_', ' ')}", "", "", f"{ratio:.2f}x"))
        print(json.dumps(results), file=sys.stderr, flush=True)  # the main figures, come what may
        local = None
        if args.compare_thread or args.kernel_checks:
            local = hf_backend(model, args.max_batch, args.batch_prefill_tokens, args.slots,
                               not args.eager_blocks)
        if args.compare_thread and local is not None:
            local.warmup(max_length=512)
            largest = concurrency.split(",")[-1]
            results["throughput_one_process"] = run_throughput(local, largest, args, rows,
                                                               label=" one process")
        if args.kernel_checks and local is not None and local.engine.graphs_enabled:
            results["kernel_agreement"] = kernel_agreement(local, model, rows)
            local.close()
            results["step_ms"] = step_kernels(local.engine, rows)
        elif local is not None:
            local.close()
    print(f"model: {label}")
    for row in rows:
        print(f"{row[0]:<40} {row[1]:>16} {row[2]:>18} {row[3]:>14}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
