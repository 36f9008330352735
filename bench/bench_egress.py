"""Benchmark of what guarding egress costs per remote call: policy decision and audit record.

Measures, with SmolLM2-135M's real BPE tokenizer (llama.cpp) and a private passage in the prompt:
1. ``Policy.remote_view`` (redaction, taint tracking, deny patterns) per call, by mode and
   prefix length;
2. ``Policy.decide`` per call (the view plus one SQLite ``BEGIN IMMEDIATE`` cap transaction);
3. ``AuditLog`` append + fsync per record, and ``verify`` throughput.

Usage: .venv/bin/python bench/bench_egress.py [--calls 50]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.audit import AuditLog, verify
from client.egress import EgressDecision, EgressOutcome, EgressRecord, EgressRequest
from client.policy import Policy
from client.settings import PolicySettings
from client.usage import UsageStore
from tandem_core.base_model import LlamaModel, smollm2_path

WORDS = ("invoice", "crates", "of", "bolts", "and", "nuts", "from", "Harbor", "Supply", "total",
         "the", "delivered", "pallets", "on", "Friday", "with", "account", "number")
LENGTHS = (256, 1024, 2048)
MODES = ("full", "redact_private", "window")


def prompt(base: LlamaModel, length: int) -> tuple[list[int], list[bool], list[int]]:
    """A prompt of about ``length`` tokens, half of it a private passage with an IBAN in it."""
    rng = random.Random(length)
    passage = " ".join(rng.choice(WORDS) for _ in range(length // 2)) + \
        " Pay to DE89 3704 0044 0532 0130 00."
    question = "\nQuestion: " + " ".join(rng.choice(WORDS) for _ in range(length // 4)) + "?\nAnswer:"
    passage_ids = base.tokenize(passage)
    public = base.tokenize("Document: ")
    tokens = [*base.tokenize("", add_bos=True), *public, *passage_ids, *base.tokenize(question)]
    mask = [False] * (1 + len(public)) + [True] * len(passage_ids)
    mask += [False] * (len(tokens) - len(mask))
    answer = base.tokenize(" " + " ".join(rng.choice(WORDS) for _ in range(200)))
    return tokens[:length], mask[:length], answer


def time_policy(base: LlamaModel, directory: Path, mode: str, length: int, calls: int) -> dict[str, float]:
    settings = PolicySettings.model_validate({
        "mode": mode, "usage_db": directory / f"{mode}-{length}.sqlite3", "per_request_calls": 10**6,
        "per_request_tokens": 10**8, "hourly_calls": 10**8, "daily_calls": 10**9})
    policy = Policy(settings, tokenizer=base, usage=UsageStore(settings.usage_db))
    tokens, mask, answer = prompt(base, length)
    view_s, decide_s = [], []
    held: Any = ()
    for step in range(calls):
        local = tokens + answer[:step]
        local_mask = mask + [False] * step
        started = time.perf_counter()
        policy.remote_view(local, local_mask)
        view_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        decision = policy.decide(EgressRequest("bench", "s", local, local_mask, held))
        decide_s.append(time.perf_counter() - started)
        held = decision.remote_view
    policy.close()
    return {"view_ms": statistics.median(view_s) * 1000,
            "decide_ms": statistics.median(decide_s) * 1000}


def time_audit(directory: Path, records: int) -> dict[str, float]:
    path = directory / "audit" / "audit.jsonl"
    log = AuditLog(path, key=b"bench-key-" * 4)
    decision = EgressDecision(True, "ok", tuple(range(600)), 560)
    record = EgressRecord("bench", "s", "http://gpu-box:8400", "expert", decision,
                          tuple(range(560, 600)), "x" * 160, 560)
    started = time.perf_counter()
    for _ in range(records // 2):
        egress_id = log.record_egress(record)
        log.record_outcome(egress_id, EgressOutcome((1, 2, 3, 4), 3, 0.02))
    append_s = (time.perf_counter() - started) / (2 * (records // 2))
    started = time.perf_counter()
    report = verify(path, key=b"bench-key-" * 4)
    verify_s = time.perf_counter() - started
    return {"append_fsync_ms": append_s * 1000, "verify_records_per_s": report.records / verify_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="decisions timed per cell")
    parser.add_argument("--records", type=int, default=400, help="audit records written")
    args = parser.parse_args()
    base = LlamaModel(smollm2_path(), n_ctx=4096)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        policy_rows = {f"{mode}@{length}": time_policy(base, directory, mode, length, args.calls)
                       for mode in MODES for length in LENGTHS}
        audit = time_audit(directory, args.records)
    base.close()
    report = {"tokenizer": "smollm2-135m", "calls": args.calls, "policy": policy_rows,
              "audit": audit}
    print(f"{'mode@prefix tokens':<24}{'view ms':>10}{'decide ms':>11}")
    for name, row in policy_rows.items():
        print(f"{name:<24}{row['view_ms']:>10.2f}{row['decide_ms']:>11.2f}")
    print(f"\naudit append + fsync: {audit['append_fsync_ms']:.2f} ms/record; "
          f"verify: {audit['verify_records_per_s']:.0f} records/s")
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
