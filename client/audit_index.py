"""An SQLite index of the audit log by request, so a lookup reads only that request's lines.

The log stays the record of truth: the index holds, per record, its ``seq``, kind, request id,
egress id and where its line lies (the file's rotation number and the byte offset). It is
written in the same step as the fsynced append, under the log's locks. A lookup reads the
indexed lines themselves from the log and checks each one's ``seq``; an index that lags behind
the log (written by an older version, or a crash between the append and the insert) or points
at a wrong line is rebuilt from the log once, so it can be slow once and wrong never.

Why SQLite: a B-tree lookup costs the same with 10 records as with 10 million, it survives
restarts, and several daemon processes can share it (its own locking), in the standard library.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    request_id TEXT NOT NULL,
    record_id TEXT NOT NULL,
    egress_id TEXT NOT NULL,
    file_number INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_request ON records (request_id);
CREATE INDEX IF NOT EXISTS records_by_egress ON records (egress_id);
"""


def index_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".index.sqlite3")


def _rotated_numbers(log_path: Path) -> list[int]:
    pattern = re.compile(re.escape(log_path.name) + r"\.(\d{6})$")
    parent = log_path.parent
    if not parent.is_dir():
        return []
    return sorted(int(match.group(1)) for name in os.listdir(parent)
                  if (match := pattern.match(name)))


def _file_for(log_path: Path, number: int) -> Path:
    """The file holding lines written while the active file would rotate to ``number``."""
    rotated = log_path.with_name(f"{log_path.name}.{number:06d}")
    return rotated if rotated.exists() else log_path


class AuditIndex:
    """Rows for the records of one audit log; ``lookup`` answers ``audit.show``."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.path = index_path(log_path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0,
                                   isolation_level=None)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # derived data: rebuilt if lost
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, record: dict[str, Any], line_length: int, *, previous_seq: int) -> None:
        """Index the record just appended (and fsynced) at the end of the active file.

        ``previous_seq`` is the seq the log ended with before it: when the index does not end
        there too (records appended without it), it is rebuilt from the log, this line included.
        """
        if self.last_seq() != previous_seq:
            logger.info("audit index %s lags behind the log; rebuilding it", self.path)
            self.rebuild()
            return
        offset = self.log_path.stat().st_size - line_length
        rotated = _rotated_numbers(self.log_path)
        number = (rotated[-1] + 1) if rotated else 1
        self._insert([_row(record, number, offset, line_length)])

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?)", rows)

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM records").fetchone()
        return -1 if row[0] is None else int(row[0])

    def lookup(self, request_id: str, *, log_last_seq: int) -> list[dict[str, Any]] | None:
        """The request's egress records and their outcomes in log order; None if stale."""
        if self.last_seq() != log_last_seq:
            return None
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, file_number, offset, length FROM records WHERE request_id = ? "
                "AND kind = 'egress' UNION SELECT seq, file_number, offset, length FROM records "
                "WHERE kind = 'outcome' AND egress_id IN (SELECT record_id FROM records "
                "WHERE request_id = ? AND kind = 'egress') ORDER BY seq",
                (request_id, request_id)).fetchall()
        found: list[dict[str, Any]] = []
        for seq, number, offset, length in rows:
            record = self._read(number, offset, length)
            if record is None or record.get("seq") != seq:
                return None
            found.append(record)
        return found

    def _read(self, number: int, offset: int, length: int) -> dict[str, Any] | None:
        try:
            with open(_file_for(self.log_path, number), "rb") as handle:
                handle.seek(offset)
                line = handle.read(length)
            record = json.loads(line)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def rebuild(self) -> int:
        """Index every record of the log afresh; returns how many."""
        rows = []
        numbers = _rotated_numbers(self.log_path)
        files = [(number, self.log_path.with_name(f"{self.log_path.name}.{number:06d}"))
                 for number in numbers]
        files.append(((numbers[-1] + 1) if numbers else 1, self.log_path))
        for number, path in files:
            if not path.exists():
                continue
            offset = 0
            with open(path, "rb") as handle:
                for line in handle:
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict) and isinstance(record.get("seq"), int):
                            rows.append(_row(record, number, offset, len(line)))
                    offset += len(line)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM records")
            self._db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?)", rows)
            self._db.execute("COMMIT")
        return len(rows)


def _row(record: dict[str, Any], number: int, offset: int, length: int) -> tuple[Any, ...]:
    return (int(record["seq"]), str(record.get("kind", "")), str(record.get("request_id", "")),
            str(record.get("id", "")), str(record.get("egress_id", "")), number, offset, length)


_open_indexes: dict[Path, AuditIndex] = {}
_open_lock = threading.Lock()


def for_log(log_path: Path) -> AuditIndex:
    """The process's index of ``log_path`` (one connection per log)."""
    key = log_path.resolve()
    with _open_lock:
        index = _open_indexes.get(key)
        if index is None:
            index = _open_indexes[key] = AuditIndex(log_path)
        return index


def indexed_show(log_path: Path, request_id: str, last_seq: int) -> list[dict[str, Any]] | None:
    """``audit.show`` through the index (rebuilt once when stale); None when it cannot help."""
    try:
        index = for_log(log_path)
        found = index.lookup(request_id, log_last_seq=last_seq)
        if found is None:
            logger.info("rebuilding the audit index %s", index.path)
            index.rebuild()
            found = index.lookup(request_id, log_last_seq=last_seq)
        return found
    except sqlite3.Error as exc:
        logger.warning("audit index unusable (%s); scanning the log", exc)
        return None
