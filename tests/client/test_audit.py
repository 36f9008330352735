"""The audit log: write-ahead records, hash chain, HMAC, rotation, tamper and crash detection."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import pytest

from client.audit import AuditLog, format_request, log_files, read_records, show, summary, verify
from client.cli import main
from client.egress import EgressDecision, EgressOutcome, EgressRecord
from client.errors import AuditError, AuditVerifyError

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def egress(request_id: str = "req-1", *, tokens: tuple[int, ...] = (5, 6, 7),
           decision: EgressDecision | None = None,
           destination: str = "http://gpu-box:8400") -> EgressRecord:
    decision = decision or EgressDecision(True, "ok", (1, 2, *tokens), 2)
    return EgressRecord(request_id=request_id, session="sess-1", destination=destination,
                        model="toy-expert", decision=decision, sent_tokens=tokens,
                        sent_text="abc", held=2)


def write_calls(log: AuditLog, calls: int, *, request_id: str = "req-1") -> None:
    for _ in range(calls):
        egress_id = log.record_egress(egress(request_id))
        log.record_outcome(egress_id, EgressOutcome(received_tokens=(9, 9), accepted_tokens=1,
                                                    latency_s=0.01))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def expect_bad_line(path: Path, line: int, why: str, *, key: bytes = KEY) -> None:
    with pytest.raises(AuditVerifyError, match=why) as caught:
        verify(path, key=key)
    assert caught.value.line == line
    assert f"line {line}:" in str(caught.value)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def test_records_are_linked_chained_and_private(log_path: Path) -> None:
    log = AuditLog(log_path, key=KEY)
    write_calls(log, 3)
    records = list(read_records(log_path))
    assert [record["kind"] for record in records] == ["egress", "outcome"] * 3
    assert [record["seq"] for record in records] == list(range(6))
    assert records[1]["egress_id"] == records[0]["id"]
    assert records[1]["request_id"] == "req-1"
    assert records[0]["sent_tokens"] == [5, 6, 7] and records[0]["sent_text"] == "abc"
    assert records[0]["decision"] == {"allowed": True, "reason": "ok", "dry_run": False,
                                      "send_from": 2, "view_tokens": 5}
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.with_name("audit.jsonl.lock").stat().st_mode) == 0o600
    assert verify(log_path, key=KEY).records == 6


def test_denied_and_dry_run_records_say_nothing_was_sent(log_path: Path) -> None:
    log = AuditLog(log_path, key=KEY)
    log.record_egress(egress(decision=EgressDecision(False, "pattern:card_number")))
    log.record_egress(egress(decision=EgressDecision(False, "dry_run", (1, 5, 6, 7), 1,
                                                     dry_run=True)))
    denied, dry = read_records(log_path)
    assert (denied["sent"], denied["sent_tokens"], denied["sent_text"]) == (False, [], "")
    assert denied["decision"]["reason"] == "pattern:card_number"
    assert (dry["sent"], dry["sent_tokens"], dry["dry_run_tokens"]) == (False, [], [5, 6, 7])
    verify(log_path, key=KEY)


def test_no_secret_reaches_the_log(log_path: Path) -> None:
    log = AuditLog(log_path, key=KEY)
    log.record_egress(egress(destination="https://user:hunter2-password@gpu-box:8400/v1"))
    data = log_path.read_bytes()
    assert b"hunter2" not in data and KEY not in data
    assert next(read_records(log_path))["destination"] == "https://gpu-box:8400/v1"


def test_tampering_with_a_field_fails_at_that_line(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY), 3)
    lines = lines_of(log_path)
    lines[2] = lines[2].replace(b'"sent_text":"abc"', b'"sent_text":"xyz"')
    log_path.write_bytes(b"".join(lines))
    expect_bad_line(log_path, 3, "edited: HMAC")


def test_deleting_a_line_fails_where_it_was(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY), 3)
    lines = lines_of(log_path)
    del lines[3]
    log_path.write_bytes(b"".join(lines))
    expect_bad_line(log_path, 4, "deleted: records 3..3")


def test_deleting_the_first_line_fails_at_line_one(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY), 2)
    log_path.write_bytes(b"".join(lines_of(log_path)[1:]))
    expect_bad_line(log_path, 1, "deleted")


def test_swapping_two_lines_fails_at_the_first(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY), 3)
    lines = lines_of(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    log_path.write_bytes(b"".join(lines))
    expect_bad_line(log_path, 3, "reordered")


def test_truncating_the_last_line_fails_at_it(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY), 2)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-40])
    expect_bad_line(log_path, 4, "truncated")


def test_verifying_with_another_key_fails_at_line_one(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY), 2)
    expect_bad_line(log_path, 1, "bad HMAC key", key=OTHER_KEY)


def test_a_record_re_signed_with_another_key_fails_at_its_line(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY), 2)
    forged = tmp_log = log_path.with_name("forged.jsonl")
    forger = AuditLog(tmp_log, key=OTHER_KEY)
    write_calls(forger, 2)
    # Splice the forger's third record in, with seq and prev fixed up to fit the chain.
    lines = lines_of(log_path)
    record = json.loads(lines_of(forged)[2])
    original = json.loads(lines[2])
    record["seq"], record["prev"] = original["seq"], original["prev"]
    from client.audit import _canonical, _sign

    record["hmac"] = _sign(OTHER_KEY, record)
    lines[2] = _canonical(record) + b"\n"
    log_path.write_bytes(b"".join(lines))
    expect_bad_line(log_path, 3, "bad HMAC key")


def test_rotation_keeps_the_chain_across_files(log_path: Path) -> None:
    log = AuditLog(log_path, key=KEY, rotate_bytes=4096)
    write_calls(log, 20)
    files = log_files(log_path)
    assert len(files) >= 3
    assert files[-1] == log_path and files[0].name == "audit.jsonl.000001"
    assert all(path.stat().st_size <= 4096 for path in files)
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)
    report = verify(log_path, key=KEY)
    assert (report.files, report.records) == (len(files), 40)
    first_of_second = json.loads(lines_of(files[1])[0])
    assert first_of_second["prev"] != "0" * 64


def test_removing_a_rotated_file_is_detected(log_path: Path) -> None:
    write_calls(AuditLog(log_path, key=KEY, rotate_bytes=4096), 20)
    files = log_files(log_path)
    files[1].unlink()
    with pytest.raises(AuditVerifyError, match=rf"{files[2].name} line 1: deleted"):
        verify(log_path, key=KEY)


def test_a_torn_final_write_is_cut_off_by_the_next_append(log_path: Path) -> None:
    log = AuditLog(log_path, key=KEY)
    write_calls(log, 1)
    with open(log_path, "ab") as handle:
        handle.write(b'{"v":1,"seq":2,"kind":"egr')
    expect_bad_line(log_path, 3, "truncated")
    write_calls(log, 1)
    assert verify(log_path, key=KEY).records == 4


def test_appends_from_eight_threads_keep_one_chain(log_path: Path) -> None:
    log = AuditLog(log_path, key=KEY)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda worker: write_calls(log, 10, request_id=f"r{worker}"), range(8)))
    assert verify(log_path, key=KEY).records == 160


def _append_in_process(path: str, calls: int) -> None:
    write_calls(AuditLog(Path(path), key=KEY, rotate_bytes=8192), calls)


def test_appends_from_two_processes_keep_one_chain(log_path: Path) -> None:
    AuditLog(log_path, key=KEY)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_in_process, args=(str(log_path), 30))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert verify(log_path, key=KEY).records == 120


_CRASH_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from client.audit import AuditLog
    from client.egress import EgressDecision, EgressOutcome, EgressRecord

    log = AuditLog(Path(sys.argv[1]), key=b"k" * 32, rotate_bytes=int(sys.argv[2]))
    decision = EgressDecision(True, "ok", (1, 2, 3), 0)
    for call in range(10**6):
        record = EgressRecord("req-%d" % call, "sess", "http://gpu:8400", "toy-expert", decision,
                              (1, 2, 3), "abc", 0)
        egress_id = log.record_egress(record)
        if call == int(sys.argv[3]):
            print("in-flight", egress_id, flush=True)  # the request is on the wire now
            time.sleep(600)
        log.record_outcome(egress_id, EgressOutcome((4,), 1, 0.001))
""")


def _start_writer(log_path: Path, *, rotate_bytes: int, hang_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CRASH_WRITER, str(log_path), str(rotate_bytes), str(hang_at)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )


def test_kill_during_a_call_leaves_the_egress_record_without_outcome(log_path: Path) -> None:
    with _start_writer(log_path, rotate_bytes=16384, hang_at=40) as writer:
        assert writer.stdout is not None
        in_flight = writer.stdout.readline().split()[1]
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    assert verify(log_path, key=KEY).records == 81
    records = list(read_records(log_path))
    assert records[-1]["kind"] == "egress" and records[-1]["id"] == in_flight
    assert not any(record.get("egress_id") == in_flight for record in records)


def test_kill_at_a_random_moment_leaves_a_verifiable_log(log_path: Path) -> None:
    with _start_writer(log_path, rotate_bytes=16384, hang_at=-1) as writer:
        while len(log_files(log_path)) < 3:  # kill it after two rotations, somewhere mid-write
            with pytest.raises(subprocess.TimeoutExpired):
                writer.wait(timeout=0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    assert verify(log_path, key=KEY).records > 10
    write_calls(AuditLog(log_path, key=KEY, rotate_bytes=16384), 1)
    verify(log_path, key=KEY)


def test_show_and_summary(log_path: Path) -> None:
    log = AuditLog(log_path, key=KEY, clock=lambda: 1_795_000_000.0)
    write_calls(log, 2, request_id="wanted")
    write_calls(log, 1, request_id="other")
    log.record_egress(egress("wanted", decision=EgressDecision(False, "cap:hourly_calls")))
    records = show(log_path, "wanted")
    assert [record["kind"] for record in records] == ["egress", "outcome"] * 2 + ["egress"]
    text = format_request(records)
    assert "SENT" in text and "DENIED" in text and "cap:hourly_calls" in text
    (row,) = summary(log_path)
    assert (row.day, row.destination, row.calls, row.denied, row.tokens, row.bytes) == (
        "2026-11-18", "http://gpu-box:8400", 3, 1, 9, 9)
    assert summary(log_path, since=date(2026, 11, 19)) == []


def test_unwritable_log_is_an_audit_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(AuditError, match="cannot create the audit directory"):
        AuditLog(blocker / "audit.jsonl", key=KEY)


def test_short_key_is_refused(log_path: Path) -> None:
    with pytest.raises(AuditError, match="too short"):
        AuditLog(log_path, key=b"short")


def test_cli_verify_show_summary(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "set", "audit-hmac", "--generate"]) == 0
    from client.secrets import SecretStore

    key = SecretStore().get("audit-hmac")
    write_calls(AuditLog(log_path, key=key), 2, request_id="cli-req")
    assert main(["audit", "verify", "--log", str(log_path)]) == 0
    assert "ok: 4 records" in capsys.readouterr().out
    assert main(["audit", "show", "--log", str(log_path), "--request", "cli-req"]) == 0
    assert "SENT" in capsys.readouterr().out
    assert main(["audit", "summary", "--log", str(log_path), "--since", "1d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["calls"] == 2
    assert main(["audit", "show", "--log", str(log_path), "--request", "nope"]) == 1
    lines = lines_of(log_path)
    del lines[1]
    log_path.write_bytes(b"".join(lines))
    assert main(["audit", "verify", "--log", str(log_path)]) == 1
    error = capsys.readouterr().err
    assert "line 2: deleted" in error and key.get_secret_value() not in error


def test_cli_verify_reads_the_log_path_from_policy(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "set", "audit-hmac", "--generate"]) == 0
    from client.secrets import SecretStore

    log_path = tmp_path / "elsewhere" / "a.jsonl"
    write_calls(AuditLog(log_path, key=SecretStore().get("audit-hmac")), 1)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'audit_log = "{log_path}"\n')
    assert main(["audit", "verify", "--policy", str(policy)]) == 0
    assert main(["audit", "verify"]) == 1
    assert "no audit log" in capsys.readouterr().err


def test_cli_verify_without_key_says_how_to_set_it(log_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    write_calls(AuditLog(log_path, key=KEY), 1)
    assert main(["audit", "verify", "--log", str(log_path)]) == 1
    assert "tandem keys set audit-hmac" in capsys.readouterr().err
