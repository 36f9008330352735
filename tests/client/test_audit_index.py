"""The audit log's SQLite index: lookups read only the request's lines, and never go wrong."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from client import audit, audit_index
from client.audit import AuditLog
from client.egress import EgressDecision, EgressOutcome, EgressRecord

KEY = b"k" * 32


def egress(log: AuditLog, request_id: str, tokens: list[int]) -> str:
    return log.record_egress(EgressRecord(
        request_id=request_id, session="s", destination="http://gateway", model="m",
        decision=EgressDecision(True, "ok", remote_view=tokens, send_from=0),
        sent_tokens=tokens, sent_text="x" * len(tokens), held=0))


def scanned(path: Path, request_id: str) -> list[dict[str, Any]]:
    """What ``audit.show`` returns by reading every record (the reference)."""
    ids: set[str] = set()
    found = []
    for record in audit.read_records(path):
        if record.get("kind") == "egress" and record.get("request_id") == request_id:
            ids.add(record["id"])
            found.append(record)
        elif record.get("kind") == "outcome" and record.get("egress_id") in ids:
            found.append(record)
    return found


def fill(log: AuditLog, requests: int) -> None:
    for index in range(requests):
        egress_id = egress(log, f"req-{index % 7}", list(range(index % 5 + 1)))
        log.record_outcome(egress_id, EgressOutcome(received_tokens=[1], accepted_tokens=1,
                                                    latency_s=0.01))


def no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> Any:
        raise AssertionError("audit.show read the whole log")

    monkeypatch.setattr(audit, "read_records", refuse)


def test_show_reads_only_the_indexed_lines_across_rotations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY, rotate_bytes=2048)
    fill(log, 40)
    assert len(audit.log_files(path)) > 3
    expected = {request: scanned(path, request) for request in ("req-0", "req-3", "none")}
    no_scan(monkeypatch)
    for request, records in expected.items():
        assert audit.show(path, request) == records
    assert expected["req-0"]
    assert audit.verify(path, key=KEY).records == 80


def test_records_written_without_the_index_are_indexed_before_a_lookup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY)
    fill(log, 6)
    # Another writer (an older version) appends without touching the index.
    monkeypatch.setattr(audit_index.AuditIndex, "add", lambda *args, **kwargs: None)
    egress(log, "req-late", [9, 9])
    monkeypatch.undo()
    assert audit.show(path, "req-late") == scanned(path, "req-late")
    assert len(audit.show(path, "req-late")) == 1
    # The next indexed append after a gap rebuilds too.
    monkeypatch.setattr(audit_index.AuditIndex, "add", lambda *args, **kwargs: None)
    egress(log, "req-gap", [1])
    monkeypatch.undo()
    egress(log, "req-after", [2])
    no_scan(monkeypatch)
    assert [r["request_id"] for r in audit.show(path, "req-gap")] == ["req-gap"]
    assert [r["request_id"] for r in audit.show(path, "req-after")] == ["req-after"]


def test_an_index_pointing_at_the_wrong_line_is_rebuilt_not_believed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY)
    fill(log, 8)
    index = audit_index.for_log(path)
    with contextlib.closing(sqlite3.connect(index.path)) as db:  # offsets shifted, as by an edit
        db.execute("UPDATE records SET offset = offset + 3")
        db.commit()
    assert audit.show(path, "req-2") == scanned(path, "req-2")
    assert audit.show(path, "req-2")


def test_an_index_that_cannot_be_written_never_blocks_the_append(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key=KEY)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(audit_index.AuditIndex, "add", broken)
    egress(log, "req-a", [1, 2])
    monkeypatch.undo()
    assert [json.loads(line)["request_id"] for line in path.read_bytes().splitlines()] == ["req-a"]
    assert len(audit.show(path, "req-a")) == 1
