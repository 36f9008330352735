"""Hostile input against the daemon: streamed bodies, schema bounds, parser bombs, page headers.

Real uvicorn on 127.0.0.1 with the scripted decoder; uploads go through the real parser worker
process.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client.daemon import create_app
from client.documents import DocumentStore
from client.errors import DocumentParseError, DocumentTooLargeError
from tandem_core.server import ServerThread
from tests.client.daemon_fakes import fake_services


def markdown_bomb() -> bytes:
    return (" *a" * 30_000).encode()  # 90 KB: the old regex clean-up froze the daemon 30 s


def html_bomb() -> bytes:
    return ("<a" * 60_000).encode()  # 120 KB: html.parser took 9.3 s


def pdf_bomb(chars: int) -> bytes:
    """A small PDF whose one compressed content stream shows ``chars`` characters of text."""
    line = b"(" + b"A" * 90 + b") Tj T*\n"
    stream = b"BT /F1 12 Tf 14 TL 72 720 Td\n" + line * (chars // 90) + b"ET"
    packed = zlib.compress(stream, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed) + packed + b"\nendstream",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


@pytest.fixture()
def daemon_url(tmp_path: Path) -> Iterator[str]:
    server = ServerThread(create_app(fake_services(tmp_path)))
    yield server.start()
    server.stop()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_chunked_body_is_cut_at_the_limit(daemon_url: str) -> None:
    """Finding 6: a chunked 64 MiB chat body took 193 s and 6.5 GiB; now a 413 at 8 MiB."""
    host, port = daemon_url.removeprefix("http://").split(":")
    before = rss_bytes()
    started = time.monotonic()
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                           .encode())
        piece = b'{"messages": [{"role": "user", "content": "' + b"a" * (1024 * 1024)
        sent = 0
        reply = b""
        for _ in range(64):
            chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
            try:
                connection.sendall(chunk)
            except OSError:
                break
            sent += len(piece)
            piece = b"a" * (1024 * 1024)
            if select.select([connection], [], [], 0)[0]:
                break
        connection.settimeout(30)
        while b"\r\n\r\n" not in reply:
            data = connection.recv(65536)
            if not data:
                break
            reply += data
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 413"), reply[-300:]
    assert sent <= 16 * 1024 * 1024  # refused while streaming, not after 64 MiB
    assert elapsed < 30
    assert rss_bytes() - before < 200 * 1024 * 1024
    assert httpx.get(daemon_url + "/health").status_code == 200


@pytest.mark.parametrize("payload", [
    {"messages": [{"role": "user", "content": "a" * 250_000}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 100}]},
    {"messages": [{"role": "user", "content": "a" * 150_000}] * 3},
])
def test_chat_content_and_messages_are_bounded(daemon_url: str, payload: dict[str, object]) -> None:
    reply = httpx.post(daemon_url + "/v1/chat/completions", json={"model": "t", **payload},
                       timeout=60)
    assert reply.status_code == 400, reply.text[:200]
    assert reply.json()["error"]["message"]


def test_completion_prompt_is_bounded(daemon_url: str) -> None:
    reply = httpx.post(daemon_url + "/v1/completions",
                       json={"model": "t", "prompt": "a" * 500_000}, timeout=60)
    assert reply.status_code == 400, reply.text[:200]


def test_the_page_sends_security_headers_and_its_script_fits_the_csp(daemon_url: str) -> None:
    page = httpx.get(daemon_url + "/")
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    scripts = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    assert scripts
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "unsafe-eval" not in csp and "script-src 'unsafe-inline'" not in csp
    assert httpx.get(daemon_url + "/health").headers["x-content-type-options"] == "nosniff"


def test_health_answers_within_200_ms_while_a_bomb_is_parsed(daemon_url: str) -> None:
    """Finding 7: parsing ran in the daemon's process; /health took 30 s behind a bomb."""
    httpx.post(daemon_url + "/v1/documents",  # start the parser worker before timing
               json={"name": "warm.md", "text": "# warm", "media_type": "text/markdown"})
    done = threading.Event()
    statuses: list[int] = []

    def upload() -> None:
        try:
            for name, data in (("bomb.md", markdown_bomb()), ("bomb.html", html_bomb()),
                               ("bomb.pdf", pdf_bomb(2_000_000))):
                statuses.append(httpx.post(daemon_url + "/v1/documents",
                                           files={"file": (name, data)}, timeout=120).status_code)
        finally:
            done.set()

    thread = threading.Thread(target=upload)
    thread.start()
    latencies = []
    with httpx.Client(base_url=daemon_url, timeout=10) as http:
        while not done.is_set():
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    thread.join()
    assert len(latencies) >= 5
    assert max(latencies) < 0.2, sorted(latencies)[-5:]
    # The markdown bomb is text; "<a<a<a..." holds none (422); the PDF passes its text limit.
    assert statuses[0] == 201 and statuses[1] in (201, 422) and statuses[2] in (413, 422)


def test_parse_time_and_extracted_text_are_bounded(tmp_path: Path) -> None:
    from client.parsing import ParseLimits, ParserWorker

    worker = ParserWorker(ParseLimits(timeout_s=2.0))
    store = DocumentStore(tmp_path / "docs.sqlite3", parser=worker)
    try:
        started = time.monotonic()
        with pytest.raises(DocumentParseError, match="longer than 2s"):
            store.ingest("slow.pdf", pdf_bomb(5_000_000))  # ~17 s of pypdf work
        assert time.monotonic() - started < 6
        with pytest.raises(DocumentTooLargeError, match="limit"):
            store.ingest("expanding.pdf", pdf_bomb(300_000))  # 1.7 KB -> 300,000 characters
        assert store.ingest("after.md", b"# Still\n\nworks fine").passages == 1
        assert store.list_documents()[0].name == "after.md"
    finally:
        worker.close()
        store.close()
