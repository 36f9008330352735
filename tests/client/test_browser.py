"""The web page in Debian's headless Chromium, driven by Playwright, against a real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client.daemon import create_app
from tandem_core.server import ServerThread
from tests.client import test_daemon
from tests.client.daemon_fakes import FakeDecoder, fake_services
from tests.client.test_daemon import ToyDaemon

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]

toy_daemon = test_daemon.toy_daemon  # the toy stack fixture, shared with the daemon tests

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="/usr/bin/chromium is missing: run `make browser` (apt-get install chromium)"),
]


def egress_records(request_id: str) -> list[dict[str, object]]:
    """What an audit log holds for a call that sent a redacted prefix."""
    return [
        {"kind": "egress", "id": "e1", "request_id": request_id, "sent": True,
         "destination": "http://127.0.0.1:8400", "decision": {"allowed": True, "reason": "ok"},
         "sent_tokens": list(range(31)),
         "sent_text": "Document: [private]\nQuestion: total?\nAnswer: 12+30="},
        {"kind": "outcome", "egress_id": "e1", "request_id": request_id,
         "received_tokens": [1, 2, 3], "accepted_tokens": 2, "latency_s": 0.012, "error": None},
        {"kind": "egress", "id": "e2", "request_id": request_id, "sent": False,
         "destination": "http://127.0.0.1:8400",
         "decision": {"allowed": False, "reason": "cap:per_request_calls"}, "sent_tokens": []},
    ]


@pytest.fixture()
def daemon_url(tmp_path: Path) -> Iterator[str]:
    services = fake_services(tmp_path / "daemon", decoder=FakeDecoder(delay_s=0.01),
                             egress_reader=egress_records)
    server = ServerThread(create_app(services))
    yield server.start()
    server.stop()


def test_upload_ask_highlight_and_egress_panel(daemon_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    document = tmp_path / "invoice.md"
    document.write_text("# Invoice 4417\n\n12 crates of bolts and 30 crates of pears.\n")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            blocked: list[str] = []  # the page must work under its own CSP
            page.on("console", lambda message: blocked.append(message.text)
                    if "Content Security Policy" in message.text else None)
            response = page.goto(daemon_url)
            assert response is not None and "script-src 'sha256-" in \
                response.headers["content-security-policy"]
            expect(page.locator("#status")).to_contain_text("tandem-fake")
            page.set_input_files("#file", str(document))
            expect(page.locator("#doc-list li .name")).to_have_text(["invoice.md"])

            page.fill("#question", "How many crates are on invoice 4417 in total?")
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            expect(answer.locator(".stats")).to_contain_text("expert")
            expect(answer).to_contain_text("= HOW MANY CRATES ARE ON INVOICE 4417 IN TOTAL?")
            expert = answer.locator(".tok.expert")
            expect(expert).to_have_count(4)
            assert expert.first.evaluate("e => getComputedStyle(e).backgroundColor") != \
                answer.locator(".tok.base").first.evaluate("e => getComputedStyle(e).backgroundColor")
            expect(answer.locator(".sources")).to_contain_text("invoice.md")
            expect(answer.locator(".tok.fallback")).to_have_text(["?"])
            expect(answer.locator(".stats")).to_contain_text("1 to double-check")

            records = page.locator("#egress li.egress-record")
            expect(records).to_have_count(2)
            expect(records.first).to_contain_text("SENT")
            expect(records.first.locator("code")).to_have_text(
                "Document: [private]\nQuestion: total?\nAnswer: 12+30=")
            expect(records.first).to_contain_text("accepted 2")
            expect(records.nth(1)).to_contain_text("DENIED")
            expect(records.nth(1)).to_contain_text("cap:per_request_calls")
            expect(page.locator("#egress .summary")).to_contain_text("1 call attempted · 1 delivered")
            page.screenshot(path=str(tmp_path / "tandem-page.png"), full_page=True)
            assert blocked == []

            page.locator("#doc-list li button").click()
            expect(page.locator("#doc-list li .name")).to_have_count(0)
        finally:
            browser.close()
    assert (tmp_path / "tandem-page.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_toy_answer_in_the_browser(toy_daemon: ToyDaemon, tmp_path: Path) -> None:
    """The toy pair behind the page: the expert's digits are highlighted, the panel is the audit log."""
    from playwright.sync_api import expect, sync_playwright

    url, questions, documents = toy_daemon
    demo = questions[0]
    document = next(path for path in documents if path.name == demo["document"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.set_input_files("#file", str(document))
            expect(page.locator("#doc-list li .name", has_text=document.name).first).to_be_visible()
            page.fill("#question", demo["question"])
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            expect(answer.locator(".stats")).to_be_visible(timeout=300_000)
            expect(answer).to_contain_text(demo["answer"].strip())
            assert answer.locator(".tok.expert").count() >= 1
            records = page.locator("#egress li.egress-record")
            expect(records.first).to_contain_text("SENT")
            sent_text = " ".join(records.locator("code").all_inner_texts())
            assert document.read_text().strip() not in sent_text
            page.screenshot(path=str(tmp_path / "tandem-toy-page.png"), full_page=True)
        finally:
            browser.close()


LOCK_KEY = "browser-lock-key-0123456789"


def derived_records(request_id: str) -> list[dict[str, object]]:
    """An audit log's account of a call that sent two values copied from a private document."""
    return [
        {"kind": "egress", "id": "e1", "request_id": request_id, "sent": True,
         "destination": "http://127.0.0.1:8400", "decision": {"allowed": True, "reason": "ok"},
         "sent_tokens": list(range(12)), "sent_text": "Answer: Total: 37+48=",
         "privacy": {"rules": {"derived": "send"}, "private_sources": ["invoice-4417.txt"],
                     "redacted": [{"text": "invoice 4417", "rule": "repeat",
                                   "source": "invoice-4417.txt"}],
                     "derived_sent": [{"value": "37", "source": "invoice-4417.txt"},
                                      {"value": "48", "source": "invoice-4417.txt"}]}},
    ]


def test_a_locked_daemon_works_in_the_browser_without_keeping_the_key(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright
    from pydantic import SecretStr

    services = fake_services(tmp_path / "daemon", decoder=FakeDecoder(delay_s=0.01),
                             egress_reader=derived_records, api_key=SecretStr(LOCK_KEY))
    server = ServerThread(create_app(services))
    url = server.start()
    document = tmp_path / "invoice-4417.txt"
    document.write_text("Invoice 4417 from Harbor Supply: 37 crates of bolts.\n")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                page = context.new_page()
                page.goto(url)
                expect(page.locator("#login")).to_be_visible()
                page.fill("#login-key", "wrong")
                page.click("#login-send")
                expect(page.locator("#login-error")).to_contain_text("wrong key")
                page.fill("#login-key", LOCK_KEY)
                page.click("#login-send")
                expect(page.locator("#login")).to_be_hidden()
                page.set_input_files("#file", str(document))
                expect(page.locator("#doc-list li .name")).to_have_text(["invoice-4417.txt"])
                page.fill("#question", "How many crates are on invoice 4417?")
                page.click("#send")
                answer = page.locator(".msg.assistant").last
                expect(answer.locator(".stats")).to_contain_text("expert")
                panel = page.locator("#egress .disclosure li")
                expect(panel.first).to_have_text(
                    "2 values copied from invoice-4417.txt were sent: 37, 48 (policy: derived = send)")
                expect(page.locator("#egress .disclosure")).to_contain_text(
                    "redacted before sending: \u201cinvoice 4417\u201d (repeats invoice-4417.txt)")
                assert "no value" not in page.locator("#egress .disclosure").inner_text()
                assert page.evaluate("localStorage.length + sessionStorage.length") == 0
                assert "tandem_session" not in page.evaluate("document.cookie")  # HttpOnly
                cookies = {cookie["name"]: cookie for cookie in context.cookies()}
                assert cookies["tandem_session"]["httpOnly"] is True
                assert cookies["tandem_session"]["sameSite"] == "Strict"
                assert LOCK_KEY not in cookies["tandem_session"]["value"]
                page.screenshot(path=str(tmp_path / "tandem-locked.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.stop()
