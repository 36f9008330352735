"""The short form of the soak benchmark (bench/soak.py; the full run is `make soak`).

16 clients for 25 s against the daemon (its own process) with the toy pair, while the proxy
breaks 10% of the expert calls: no failed request, no server error, caps hold, the audit log
verifies, and the daemon's memory does not grow by 10% between the middle and the end.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_short_soak_under_faults(toy_pair: object, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "soak", Path(__file__).resolve().parents[1] / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # dataclasses look their module up while the class is built
    spec.loader.exec_module(soak)
    result = soak.run_soak(clients=16, duration_s=25, fault_rate=0.10, seed=3,
                           work_dir=tmp_path / "soak", progress=False)
    print(soak.report(result))
    assert result.requests >= 16
    assert (result.failed, result.server_errors) == (0, 0), result.errors
    assert result.caps_hold, (result.wire_calls, result.audit_sent, result.usage_calls)
    assert result.audit_verify, result.errors
    assert result.rss_growth < 0.10
    assert sum(result.faults.get(kind, 0) for kind in result.faults if kind != "pass") > 0
