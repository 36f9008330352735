"""Soak: concurrent clients against the daemon with the toy pair while the wire is faulty.

The daemon (`tandem serve`, its own process, so its memory is its own) runs the toy base and
head; its expert is the toy expert gateway (in this process) behind the fault-injecting proxy
(``tests.fault_proxy``), which breaks ``--fault-rate`` of the calls: latency, dropped replies,
503s, malformed or truncated JSON, out-of-vocabulary ids, impossible log-probs, trickled bytes,
hangs. ``--clients`` threads ask the demo questions over the documents for ``--duration``
seconds, each as its own OpenAI ``user``.

Pass criteria (exit 1 otherwise): no failed request and no server error; the caps hold (no
request has more calls on the wire than ``per_request_calls``, and the usage database counted
exactly the calls the audit log shows were sent, retries included); ``tandem audit verify``
passes afterwards; the daemon's resident memory grows by less than 10% between the middle and
the end of the run (minute 1 and minute 2 of the full run).

    python bench/soak.py                       # full: 32 clients, 120 s (`make soak`)
    python bench/soak.py --duration 25 --clients 16   # the short form `make test` runs

Prints a table and one JSON line. The machine may be shared: latencies are for this run only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: tests.fault_proxy is needed
    sys.path.insert(0, str(ROOT))

AUDIT_KEY = "soak-audit-key-0123456789abcdef0123456789"
PER_REQUEST_CALLS = 6


@dataclass
class SoakResult:
    clients: int
    duration_s: float
    fault_rate: float
    requests: int = 0
    failed: int = 0
    server_errors: int = 0
    p50_s: float = 0.0
    p99_s: float = 0.0
    fallback_tokens: int = 0
    expert_tokens: int = 0
    denied_tokens: int = 0
    answers_with_fallback: int = 0
    wire_calls: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    audit_sent: int = 0
    usage_calls: int = 0
    max_calls_per_request: int = 0
    caps_hold: bool = False
    audit_verify: bool = False
    rss_mid_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_growth: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.failed == 0 and self.server_errors == 0 and self.caps_hold
                and self.audit_verify and self.rss_growth < 0.10 and self.requests > 0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_configs(directory: Path, *, toy: Any, head: Path, expert_url: str, port: int) -> Path:
    policy = directory / "policy.toml"
    policy.write_text(
        # The toy answers copy the invoice's numbers; "send" keeps the expert busy under faults.
        f'mode = "redact_private"\nderived = "send"\nper_request_calls = {PER_REQUEST_CALLS}\n'
        f'usage_db = "{directory / "usage.sqlite3"}"\naudit_log = "{directory / "audit.jsonl"}"\n')
    config = directory / "client.toml"
    config.write_text(
        f'[base]\npreset = "toy"\npath = "{toy.base_gguf}"\nn_ctx = 512\n\n'
        f'[switch]\npath = "{head}"\n\n'
        f'[expert]\nurl = "{expert_url}"\nmodel = "toy-expert"\ntimeout_s = 2.0\n'
        f'retries = 1\nbreaker_failures = 50\nbreaker_reset_s = 2.0\n\n'
        f'[decoding]\nmax_tokens = 24\n\n'
        f'[daemon]\nport = {port}\ndata_dir = "{directory / "data"}"\nmax_queue = 256\n'
        f'max_queue_per_client = 8\npolicy_config = "{policy}"\n')
    return config


def run_soak(*, clients: int, duration_s: float, fault_rate: float, seed: int = 0,
             work_dir: Path | None = None, progress: bool = True) -> SoakResult:
    from export.pipeline import ensure_toy_head, serve_gateway
    from export.toy import ensure_toy_pair
    from tests.fault_proxy import ALL_FAULTS, FaultProxy

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda _: None)
    toy = ensure_toy_pair()
    head = Path(ensure_toy_head(toy))
    directory = Path(work_dir or tempfile.mkdtemp(prefix="tandem-soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    result = SoakResult(clients=clients, duration_s=duration_s, fault_rate=fault_rate)
    with serve_gateway(Path(toy.expert_gguf)) as gateway_url, \
            FaultProxy(gateway_url, rate=fault_rate, kinds=ALL_FAULTS, seed=seed,
                       trickle_s=0.5) as proxy:
        port = free_port()
        config = write_configs(directory, toy=toy, head=head, expert_url=proxy.url, port=port)
        env = {**os.environ, "TANDEM_AUDIT_HMAC_KEY": AUDIT_KEY, "PYTHONPATH": str(ROOT),
               "OMP_WAIT_POLICY": "PASSIVE"}
        log = open(directory / "daemon.log", "wb")  # noqa: SIM115 - closed below
        daemon = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--config",
                                   str(config)], env=env, cwd=directory, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, daemon)
            questions = _prepare(url, toy)
            say(f"soak: daemon pid {daemon.pid} on {url}; {clients} clients for {duration_s:g}s, "
                f"{fault_rate:.0%} faults")
            _drive(url, questions, clients, duration_s, daemon.pid, result)
        finally:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            log.close()
        wire = [request for request in proxy.requests if "/v1/continue" in request.line]
        result.wire_calls = len(wire)
        result.faults = proxy.faults()
    _check_audit(directory, result, env)
    return result


def _wait_healthy(url: str, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}; see its log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the daemon did not become healthy in 300 s")


def _prepare(url: str, toy: Any) -> list[dict[str, str]]:
    with httpx.Client(base_url=url, timeout=120) as http:
        for path in sorted(Path(toy.documents_dir).iterdir()):
            http.post("/v1/documents", files={"file": (path.name, path.read_bytes())}
                      ).raise_for_status()
    questions = json.loads(Path(toy.demo_questions_json).read_text())
    return [question for question in questions if question.get("question")]


def _drive(url: str, questions: list[dict[str, str]], clients: int, duration_s: float,
           pid: int, result: SoakResult) -> None:
    lock = threading.Lock()
    latencies: list[float] = []
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    deadline = started + duration_s
    stop = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            turn = number
            while time.monotonic() < deadline:
                question = questions[turn % len(questions)]["question"]
                turn += clients
                begun = time.monotonic()
                try:
                    reply = http.post("/v1/chat/completions", json={
                        "model": "tandem", "user": f"client-{number}",
                        "messages": [{"role": "user", "content": question}]})
                    status = reply.status_code
                    body = reply.json() if status == 200 else {}
                except (httpx.HTTPError, ValueError) as exc:
                    status, body = -1, {"error": repr(exc)}
                elapsed = time.monotonic() - begun
                with lock:
                    result.requests += 1
                    latencies.append(elapsed)
                    if status != 200:
                        result.failed += 1
                        result.server_errors += status >= 500
                        if len(result.errors) < 5:
                            result.errors.append(f"{status}: {str(body)[:200]}")
                        continue
                    counts = body["tandem"]["provenance"]
                    result.fallback_tokens += counts["fallback"]
                    result.expert_tokens += counts["expert"]
                    result.denied_tokens += counts["denied"]
                    result.answers_with_fallback += counts["fallback"] > 0

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((time.monotonic() - started, rss_bytes(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    sampler.join()
    if latencies:
        ordered = sorted(latencies)
        result.p50_s = round(statistics.median(ordered), 3)
        result.p99_s = round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)
    middle = duration_s / 2
    mid = [rss for moment, rss in samples if moment <= middle]
    end = [rss for moment, rss in samples if moment <= duration_s]
    if mid and end:
        result.rss_mid_mib = round(mid[-1] / 2**20, 1)
        result.rss_end_mib = round(end[-1] / 2**20, 1)
        result.rss_growth = round(end[-1] / mid[-1] - 1.0, 4)


def _check_audit(directory: Path, result: SoakResult, env: dict[str, str]) -> None:
    from client.audit import read_records
    from client.usage import UsageStore

    audit = directory / "audit.jsonl"
    verified = subprocess.run([sys.executable, "-m", "client.cli", "audit", "verify", "--log",
                               str(audit)], env=env, cwd=directory, capture_output=True,
                              text=True, check=False)
    result.audit_verify = verified.returncode == 0
    if not result.audit_verify:
        result.errors.append("audit verify: " + (verified.stdout + verified.stderr)[-300:])
    per_request: dict[str, int] = {}
    for record in read_records(audit):
        if record.get("kind") == "egress" and record.get("sent"):
            result.audit_sent += 1
            per_request[record["request_id"]] = per_request.get(record["request_id"], 0) + 1
    result.max_calls_per_request = max(per_request.values(), default=0)
    store = UsageStore(directory / "usage.sqlite3")
    try:
        result.usage_calls = store.current()["day"].calls
    finally:
        store.close()
    result.caps_hold = (result.max_calls_per_request <= PER_REQUEST_CALLS
                        and result.usage_calls == result.audit_sent == result.wire_calls)


def report(result: SoakResult) -> str:
    rows = [
        ("clients x duration", f"{result.clients} x {result.duration_s:g} s"),
        ("fault rate on the wire", f"{result.fault_rate:.0%}"),
        ("requests", result.requests),
        ("failed / server errors", f"{result.failed} / {result.server_errors}"),
        ("latency p50 / p99", f"{result.p50_s:.2f} s / {result.p99_s:.2f} s"),
        ("tokens expert / fallback / denied",
         f"{result.expert_tokens} / {result.fallback_tokens} / {result.denied_tokens}"),
        ("answers with a fallback", result.answers_with_fallback),
        ("expert calls: wire / audit / usage db",
         f"{result.wire_calls} / {result.audit_sent} / {result.usage_calls}"),
        ("most calls in one request", f"{result.max_calls_per_request} (cap {PER_REQUEST_CALLS})"),
        ("faults injected", ", ".join(f"{k}={v}" for k, v in sorted(result.faults.items()))),
        ("audit verify", "ok" if result.audit_verify else "FAILED"),
        ("daemon RSS middle -> end",
         f"{result.rss_mid_mib:.1f} -> {result.rss_end_mib:.1f} MiB ({result.rss_growth:+.1%})"),
        ("verdict", "PASS" if result.passed else "FAIL"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds")
    parser.add_argument("--fault-rate", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    result = run_soak(clients=args.clients, duration_s=args.duration, fault_rate=args.fault_rate,
                      seed=args.seed, work_dir=args.work_dir)
    print(report(result))
    for error in result.errors:
        print(f"error: {error}")
    print(json.dumps({"bench": "soak", **asdict(result), "passed": result.passed},
                     separators=(",", ":")))
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
