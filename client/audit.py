"""Write-ahead, hash-chained, HMAC-signed audit log of everything that leaves the machine.

One JSON object per line. An ``egress`` record is appended and fsynced before a request goes
out (also for denials and dry runs); an ``outcome`` record, linked by ``egress_id``, follows the
call. Each record carries ``seq`` (one more than the previous record's), ``prev`` (SHA-256 of the
previous line's bytes; 64 zeros for the first), ``key_id`` (which HMAC key signed it) and ``hmac``
(HMAC-SHA256 over the record without ``hmac``). Editing, deleting, reordering or truncating
records, or signing them with another key, breaks one of these at the first bad line.

Files are created 0600. When the active file would pass ``rotate_bytes`` it is renamed to
``<name>.000001`` (then ``.000002``...) and a new one started; the chain runs on across files.
Appends from threads and processes are serialized by a lock file next to the log.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from client.egress import EgressOutcome, EgressRecord
from client.errors import AuditError, AuditVerifyError

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
FORMAT_VERSION = 1
_TAIL_CHUNK = 64 * 1024
_REMEMBERED_CALLS = 4096
MAX_ERROR_CHARS = 500  # a hostile gateway's error text must not swell the log
_REQUIRED = ("v", "seq", "id", "kind", "time", "key_id", "prev", "hmac")


def key_id(key: bytes) -> str:
    """A public name for an HMAC key: tells which key signed a record without revealing it."""
    return hmac.new(key, b"tandem audit key id", hashlib.sha256).hexdigest()[:16]


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def _sign(key: bytes, record: dict[str, Any]) -> str:
    unsigned = {name: value for name, value in record.items() if name != "hmac"}
    return hmac.new(key, _canonical(unsigned), hashlib.sha256).hexdigest()


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _key_bytes(key: SecretStr | bytes) -> bytes:
    raw = key.get_secret_value().encode() if isinstance(key, SecretStr) else key
    if len(raw) < 16:
        raise AuditError("the audit HMAC key is too short (need at least 16 bytes)")
    return raw


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def log_files(path: Path) -> list[Path]:
    """The rotated files, oldest first, then the active file (those that exist)."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d{6})$")
    rotated = sorted(
        (int(match.group(1)), candidate)
        for candidate in (path.parent.iterdir() if path.parent.is_dir() else ())
        if (match := pattern.match(candidate.name))
    )
    files = [candidate for _, candidate in rotated]
    return [*files, path] if path.exists() else files


class AuditLog:
    """Appends signed records; implements ``client.egress.AuditSink``."""

    def __init__(
        self,
        path: Path,
        *,
        key: SecretStr | bytes,
        rotate_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._key = _key_bytes(key)
        self._key_id = key_id(self._key)
        self._rotate_bytes = rotate_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, str] = {}  # egress id -> request id, for outcome records
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise AuditError(f"cannot create the audit directory {path.parent}: {exc}") from exc

    @property
    def path(self) -> Path:
        return self._path

    def record_egress(self, record: EgressRecord) -> str:
        """Append and fsync the record before anything is sent; return its id."""
        decision = record.decision
        sent = decision.allowed and not decision.dry_run
        body: dict[str, Any] = {
            "kind": "egress",
            "request_id": record.request_id,
            "session": record.session,
            "destination": _without_credentials(record.destination),
            "model": record.model,
            "held": record.held,
            "decision": {
                "allowed": decision.allowed,
                "reason": decision.reason,
                "dry_run": decision.dry_run,
                "send_from": decision.send_from,
                "view_tokens": len(decision.remote_view),
            },
            "sent": sent,
            "sent_tokens": [int(token) for token in record.sent_tokens] if sent else [],
            "sent_text": record.sent_text if sent else "",
            "sent_bytes": len(record.sent_text.encode()) if sent else 0,
        }
        if decision.privacy:  # issue 14: rules applied, derived tokens sent (client.policy)
            body["privacy"] = dict(decision.privacy)
        if decision.dry_run:
            would_send = record.sent_tokens or decision.new_tokens
            body["dry_run_tokens"] = [int(token) for token in would_send]
            body["dry_run_text"] = record.sent_text
        egress_id = self._append(body)
        with self._lock:
            if len(self._requests) >= _REMEMBERED_CALLS:  # calls whose outcome never came
                del self._requests[next(iter(self._requests))]
            self._requests[egress_id] = record.request_id
        return egress_id

    def record_outcome(self, egress_id: str, outcome: EgressOutcome) -> None:
        """Append what came back for the call ``egress_id``."""
        with self._lock:
            request_id = self._requests.pop(egress_id, "")
        self._append({
            "kind": "outcome",
            "egress_id": egress_id,
            "request_id": request_id,
            "received_tokens": [int(token) for token in outcome.received_tokens],
            "accepted_tokens": outcome.accepted_tokens,
            "latency_s": round(outcome.latency_s, 6),
            "error": _capped(outcome.error),
            "delivered": outcome.delivered,
            "answered": outcome.answered,
            "extra": outcome.extra,
        })

    def _append(self, body: dict[str, Any]) -> str:
        """Sign, append and fsync one record; AuditError (nothing sent) when that fails."""
        record_id = uuid.uuid4().hex
        stamp = datetime.fromtimestamp(self._clock(), tz=UTC).isoformat(timespec="milliseconds")
        with self._lock, self._file_lock():
            try:
                last_seq, last_hash = self._tail_state()
                record = {**body, "v": FORMAT_VERSION, "seq": last_seq + 1, "id": record_id,
                          "time": stamp, "key_id": self._key_id, "prev": last_hash}
                record["hmac"] = _sign(self._key, record)
                line = _canonical(record) + b"\n"
                self._write_line(line)
                _index_append(self._path, record, len(line), previous_seq=last_seq)
            except OSError as exc:
                raise AuditError(f"cannot write the audit log {self._path}: {exc}") from exc
        return record_id

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit lock file {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _tail_state(self) -> tuple[int, str]:
        """(seq, hash) of the last record, from the active file or else the newest rotated one."""
        for candidate in reversed(log_files(self._path)):
            last = _last_line(candidate, repair=candidate == self._path)
            if last is not None:
                return int(json.loads(last)["seq"]), _line_hash(last)
        return -1, GENESIS

    def _write_line(self, line: bytes) -> None:
        size = self._path.stat().st_size if self._path.exists() else 0
        if size and size + len(line) > self._rotate_bytes:
            self._rotate()
        created = not self._path.exists()
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self._path.parent)

    def _rotate(self) -> None:
        rotated = log_files(self._path)[:-1]
        number = int(rotated[-1].name.rsplit(".", 1)[1]) + 1 if rotated else 1
        os.rename(self._path, self._path.with_name(f"{self._path.name}.{number:06d}"))
        _fsync_directory(self._path.parent)


def _capped(error: str | None) -> str | None:
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return error[:MAX_ERROR_CHARS] + f"... [{len(error) - MAX_ERROR_CHARS} more characters]"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_line(path: Path, *, repair: bool) -> bytes | None:
    """The last complete line of ``path``; a torn final write is cut off first when ``repair``.

    A torn line was never acknowledged (its fsync did not return), so its request never left.
    """
    with open(path, "rb+" if repair else "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        data = b""
        position = end
        while position > 0 and data.count(b"\n") < 2:
            step = min(_TAIL_CHUNK, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
        lines = data.split(b"\n")
        if lines[-1]:  # the file does not end with a newline
            if not repair:
                raise AuditError(f"{path} ends with a torn record")
            if _parses(lines[-1]):
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(end - len(lines[-1]))
                lines[-1] = b""
            handle.flush()
            os.fsync(handle.fileno())
        complete = [line for line in lines[:-1] if line] + ([lines[-1]] if lines[-1] else [])
        return complete[-1] if complete else None


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# --- reading: verify, show, summary ---------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    files: int
    records: int


def verify(path: Path, *, key: SecretStr | bytes) -> VerifyReport:
    """Check the whole chain under ``path``; AuditVerifyError names the first bad line and why."""
    raw_key = _key_bytes(key)
    expected_key_id = key_id(raw_key)
    files = log_files(path)
    if not files:
        raise AuditError(f"no audit log at {path}")
    expected_seq, previous_hash, records = 0, GENESIS, 0
    all_seqs = _all_seqs(files)
    for file_index, log_path in enumerate(files):
        lines = _read_lines(log_path)
        for number, (line, complete) in enumerate(lines, start=1):
            last_line = file_index == len(files) - 1 and number == len(lines)
            problem = _check_line(
                line, complete=complete, last_line=last_line, expected_seq=expected_seq,
                previous_hash=previous_hash, key=raw_key, expected_key_id=expected_key_id,
                all_seqs=all_seqs,
            )
            if problem:
                raise AuditVerifyError(f"{log_path} line {number}: {problem}", line=number)
            expected_seq, previous_hash, records = expected_seq + 1, _line_hash(line), records + 1
    return VerifyReport(files=len(files), records=records)


def _read_lines(path: Path) -> list[tuple[bytes, bool]]:
    """Lines of a file and whether each ended with a newline."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc}") from exc
    pieces = data.split(b"\n")
    lines = [(piece, True) for piece in pieces[:-1]]
    if pieces[-1]:
        lines.append((pieces[-1], False))
    return lines


def _all_seqs(files: list[Path]) -> set[int]:
    seqs: set[int] = set()
    for log_path in files:
        for line, _ in _read_lines(log_path):
            record = _loads(line)
            if record is not None and isinstance(record.get("seq"), int):
                seqs.add(record["seq"])
    return seqs


def _loads(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _check_line(
    line: bytes, *, complete: bool, last_line: bool, expected_seq: int, previous_hash: str,
    key: bytes, expected_key_id: str, all_seqs: set[int],
) -> str:
    """Why this line is bad, or '' when it is good."""
    record = _loads(line)
    if record is None or not complete:
        if last_line and (record is None or not complete):
            return "truncated: the last record is incomplete"
        return "edited: not a JSON record"
    missing = [name for name in _REQUIRED if name not in record]
    if missing:
        return f"edited: missing field {missing[0]!r}"
    seq = record["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        return "edited: seq is not an integer"
    if seq != expected_seq:
        # Records before this line all had smaller seqs, so a missing seq anywhere is a deletion.
        if seq > expected_seq and expected_seq not in all_seqs:
            return f"deleted: records {expected_seq}..{seq - 1} are missing before this line"
        return f"reordered: record seq {seq} found where seq {expected_seq} was expected"
    if record["prev"] != previous_hash:
        return "edited: prev does not match the hash of the previous record"
    if record["key_id"] != expected_key_id:
        return (f"bad HMAC key: signed with key {record['key_id']}, "
                f"but the audit-hmac secret is key {expected_key_id}")
    if not hmac.compare_digest(str(record["hmac"]), _sign(key, record)):
        return "edited: HMAC does not match the record's content"
    return ""


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every parsable record, oldest first, across rotated files (no verification)."""
    for log_path in log_files(path):
        for line, _ in _read_lines(log_path):
            record = _loads(line)
            if record is not None:
                yield record


def show(path: Path, request_id: str) -> list[dict[str, Any]]:
    """The egress records of one request and the outcomes linked to them, in log order."""
    indexed = _index_show(path, request_id)
    if indexed is not None:
        return indexed
    egress_ids: set[str] = set()
    found = []
    for record in read_records(path):
        if record.get("kind") == "egress" and record.get("request_id") == request_id:
            egress_ids.add(record["id"])
            found.append(record)
        elif record.get("kind") == "outcome" and record.get("egress_id") in egress_ids:
            found.append(record)
    return found


def _index_append(path: Path, record: dict[str, Any], length: int, *, previous_seq: int) -> None:
    """Index the appended record (client.audit_index); the log stays right if this fails."""
    import sqlite3

    from client import audit_index

    try:
        audit_index.for_log(path).add(record, length, previous_seq=previous_seq)
    except (sqlite3.Error, OSError) as exc:
        logger.warning("audit index not updated (%s); lookups will rebuild it", exc)


def _index_show(path: Path, request_id: str) -> list[dict[str, Any]] | None:
    """``show`` through the index, at a cost independent of the log's length; None: scan."""
    from client import audit_index

    last_seq = -1
    for candidate in reversed(log_files(path)):
        last = _last_line(candidate, repair=False)
        if last is not None:
            last_seq = int(json.loads(last)["seq"])
            break
    if last_seq < 0:
        return None
    return audit_index.indexed_show(path, request_id, last_seq)


def format_request(records: list[dict[str, Any]]) -> str:
    """A readable account of what left for one request."""
    lines = []
    for record in records:
        if record["kind"] == "egress":
            decision = record.get("decision", {})
            verdict = "SENT" if record.get("sent") else (
                "DRY RUN" if decision.get("dry_run") else "DENIED")
            lines.append(
                f"{record['time']}  {verdict:<7} {decision.get('reason', '?'):<24} "
                f"{record.get('destination', '')} model={record.get('model', '')} "
                f"held={record.get('held', 0)} tokens={len(record.get('sent_tokens', []))}"
            )
            if record.get("sent"):
                lines.append(f"    text: {record.get('sent_text', '')!r}")
        else:
            outcome = (f"{_delivery(record)} error={record['error']}" if record.get("error") else
                       f"received={len(record.get('received_tokens', []))} "
                       f"accepted={record.get('accepted_tokens', 0)}")
            lines.append(f"{record['time']}  OUTCOME {outcome} latency={record.get('latency_s', 0)}s")
    return "\n".join(lines)


def _delivery(outcome: dict[str, Any]) -> str:
    if outcome.get("answered", True):
        return "answered"
    return "delivered, no answer" if outcome.get("delivered", True) else "NOT DELIVERED"


@dataclass
class SummaryRow:
    """``calls``/``tokens``/``bytes`` count attempts; ``undelivered`` those that never left."""

    day: str
    destination: str
    calls: int = 0
    denied: int = 0
    tokens: int = 0
    bytes: int = 0
    undelivered: int = 0


def summary(path: Path, *, since: date | None = None) -> list[SummaryRow]:
    """Calls attempted and denied, tokens and bytes sent, per UTC day and gateway."""
    rows: dict[tuple[str, str], SummaryRow] = {}
    undelivered: set[str] = set()
    for record in read_records(path):
        if record.get("kind") == "outcome" and record.get("delivered") is False:
            undelivered.add(str(record.get("egress_id")))
    for record in read_records(path):
        if record.get("kind") != "egress":
            continue
        day = str(record.get("time", ""))[:10]
        if since is not None and day < since.isoformat():
            continue
        destination = str(record.get("destination", ""))
        row = rows.setdefault((day, destination), SummaryRow(day, destination))
        if record.get("sent"):
            row.calls += 1
            row.tokens += len(record.get("sent_tokens", []))
            row.bytes += int(record.get("sent_bytes", 0))
            row.undelivered += record.get("id") in undelivered
        else:
            row.denied += 1
    return [rows[key] for key in sorted(rows)]
