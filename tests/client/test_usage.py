"""Usage counters: caps hold under threads and processes, and survive a reopen."""

from __future__ import annotations

import multiprocessing
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client.errors import PolicyError
from client.usage import Caps, Usage, UsageStore

BIG = 10**9


def caps(**overrides: int) -> Caps:
    values = dict(per_request_calls=BIG, per_request_tokens=BIG, hourly_calls=BIG,
                  hourly_tokens=BIG, daily_calls=BIG, daily_tokens=BIG)
    values.update(overrides)
    return Caps(**values)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


T0 = 1_795_000_000.0  # 2026-11-18 07:06:40 UTC


def test_each_cap_names_itself(tmp_path: Path) -> None:
    cases = {
        "per_request_calls": (caps(per_request_calls=2), 1),
        "per_request_tokens": (caps(per_request_tokens=5), 2),
        "hourly_calls": (caps(hourly_calls=2), 1),
        "hourly_tokens": (caps(hourly_tokens=5), 2),
        "daily_calls": (caps(daily_calls=2), 1),
        "daily_tokens": (caps(daily_tokens=5), 2),
    }
    for name, (limits, tokens) in cases.items():
        store = UsageStore(tmp_path / f"{name}.sqlite3", clock=Clock(T0))
        assert store.try_consume("r", tokens, limits) is None
        assert store.try_consume("r", tokens, limits) is None
        assert store.try_consume("r", tokens, limits) == name
        store.close()


def test_a_refused_call_is_not_counted(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite3", clock=Clock(T0))
    limits = caps(per_request_tokens=10)
    assert store.try_consume("r", 8, limits) is None
    assert store.try_consume("r", 5, limits) == "per_request_tokens"
    assert store.try_consume("r", 2, limits) is None
    assert store.current("r")["request"] == Usage(calls=2, tokens=10)


def test_zero_cap_allows_nothing(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite3")
    assert store.try_consume("r", 0, caps(daily_calls=0)) == "daily_calls"


def test_windows_roll_over_by_hour_and_day(tmp_path: Path) -> None:
    clock = Clock(T0)
    store = UsageStore(tmp_path / "u.sqlite3", clock=clock)
    limits = caps(hourly_calls=1, daily_calls=2)
    assert store.try_consume("a", 1, limits) is None
    assert store.try_consume("b", 1, limits) == "hourly_calls"
    clock.now += 3600
    assert store.try_consume("c", 1, limits) is None
    clock.now += 3600
    assert store.try_consume("d", 1, limits) == "daily_calls"
    clock.now += 86400
    assert store.try_consume("e", 1, limits) is None


def test_daily_caps_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    limits = caps(daily_tokens=100)
    first = UsageStore(path, clock=Clock(T0))
    assert first.try_consume("r1", 60, limits) is None
    first.close()
    second = UsageStore(path, clock=Clock(T0 + 60))
    assert second.current()["day"] == Usage(calls=1, tokens=60)
    assert second.try_consume("r2", 60, limits) == "daily_tokens"
    assert second.try_consume("r2", 40, limits) is None


def test_old_rows_are_pruned_but_this_days_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    clock = Clock(T0)
    store = UsageStore(path, clock=clock)
    assert store.try_consume("old-request", 5, caps()) is None
    store.close()
    clock.now += 3 * 86400
    reopened = UsageStore(path, clock=clock)
    with sqlite3.connect(path) as db:
        scopes = {row[0] for row in db.execute("SELECT scope FROM usage")}
    assert scopes == {"hour", "day"}  # request rows go after two days, windows after ninety
    clock.now = T0
    assert reopened.current()["day"] == Usage(calls=1, tokens=5)


def test_would_exceed_counts_nothing(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite3")
    assert store.would_exceed("r", 3, caps(per_request_calls=1)) is None
    assert store.would_exceed("r", 3, caps(per_request_tokens=2)) == "per_request_tokens"
    assert store.current("r")["request"] == Usage()


def test_database_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    UsageStore(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_eight_threads_never_pass_the_cap(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "u.sqlite3")
    limits = caps(hourly_calls=50)

    def attempts(worker: int) -> int:
        return sum(store.try_consume(f"r{worker}", 1, limits) is None for _ in range(20))

    with ThreadPoolExecutor(max_workers=8) as pool:
        allowed = sum(pool.map(attempts, range(8)))
    assert allowed == 50
    assert store.current()["hour"].calls == 50


def _consume_in_process(path: str, attempts: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = UsageStore(Path(path))
    limits = caps(daily_calls=60)
    results.put(sum(store.try_consume("shared", 1, limits) is None for _ in range(attempts)))
    store.close()


def test_two_processes_share_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    UsageStore(path).close()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_consume_in_process, args=(str(path), 50, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    allowed = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sum(allowed) == 60
    assert UsageStore(path).current()["day"].calls == 60


def test_unusable_database_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    path.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(PolicyError, match="usage database"):
        UsageStore(path)


def test_unusable_location_is_a_policy_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PolicyError, match="cannot open the usage database"):
        UsageStore(blocker / "u.sqlite3")
