"""The document store against real SQLite FTS5 and real pypdf."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from client.documents import (
    DocumentNotFoundError,
    DocumentStore,
    chunk_text,
    detect_media_type,
    fts_query,
    html_text,
    markdown_text,
)
from client.errors import DocumentParseError, DocumentTooLargeError


def make_pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` in Helvetica, written by hand (valid xref offsets)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
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
def store(tmp_path: Path) -> DocumentStore:
    opened = DocumentStore(tmp_path / "data" / "documents.sqlite3", max_bytes=64 * 1024)
    yield opened
    opened.close()


def test_text_ingest_and_search_finds_the_right_passage(store: DocumentStore) -> None:
    store.add_text("notes.txt", "The boiler was serviced in March.\n\nInvoice 77 lists 12 chairs.")
    store.add_text("other.txt", "Penguins live in the southern hemisphere.")
    passages = store.search("How many chairs are on invoice 77?", k=1)
    assert [p.text for p in passages] == ["The boiler was serviced in March. Invoice 77 lists 12 chairs."]
    assert passages[0].document_name == "notes.txt"
    assert store.search("penguins", k=5)[0].document_name == "other.txt"


def test_pdf_ingest_extracts_text(store: DocumentStore) -> None:
    info = store.ingest("report.pdf", make_pdf("Quarterly revenue was 4711 dollars"))
    assert info.media_type == "application/pdf"
    assert "4711" in store.search("quarterly revenue", k=1)[0].text


def test_corrupt_pdf_is_a_parse_error(store: DocumentStore) -> None:
    with pytest.raises(DocumentParseError, match="PDF"):
        store.ingest("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog garbage")
    assert store.list_documents() == []


def test_html_ingest_strips_tags_scripts_and_styles(store: DocumentStore) -> None:
    page = (
        "<html><head><title>x</title><style>p {color: red}</style></head><body>"
        "<h1>Lease</h1><p>The rent is <b>950</b> euros &amp; due monthly.</p>"
        "<script>var secret = 1;</script></body></html>"
    )
    store.ingest("lease.html", page.encode())
    text = store.search("rent", k=1)[0].text
    assert text == "Lease The rent is 950 euros & due monthly."
    assert store.search("secret color", k=1) == []


def test_markdown_ingest_removes_markup(store: DocumentStore) -> None:
    source = "# Budget\n\n- **Travel**: 300 [see](http://example.com)\n- `Food`: 120\n"
    info = store.ingest("budget.md", source.encode())
    assert info.media_type == "text/markdown"
    assert store.search("travel food", k=1)[0].text == "Budget Travel: 300 see Food: 120"


def test_deletion_removes_from_retrieval_and_listing(store: DocumentStore) -> None:
    kept = store.add_text("a.txt", "Apples cost 3 coins.")
    gone = store.add_text("b.txt", "Bananas cost 5 coins.")
    assert len(store.search("bananas", k=3)) == 1
    store.delete(gone.id)
    assert store.search("bananas", k=3) == []
    assert [d.id for d in store.list_documents()] == [kept.id]
    with pytest.raises(DocumentNotFoundError):
        store.delete(gone.id)
    with pytest.raises(DocumentNotFoundError):
        store.get(gone.id)


def test_too_large_document_is_refused(store: DocumentStore) -> None:
    with pytest.raises(DocumentTooLargeError, match="limit"):
        store.add_text("big.txt", "x" * (64 * 1024 + 1))


def test_undecodable_and_unsupported_documents_are_parse_errors(store: DocumentStore) -> None:
    with pytest.raises(DocumentParseError, match="UTF-8"):
        store.ingest("bad.txt", b"\xff\xfe\xfa not text")
    with pytest.raises(DocumentParseError, match="unsupported"):
        store.ingest("image.png", b"\x89PNG....", media_type="image/png")
    with pytest.raises(DocumentParseError, match="no text"):
        store.add_text("blank.txt", "  \n\n  ")


def test_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "documents.sqlite3"
    first = DocumentStore(path)
    info = first.add_text("kept.txt", "Durable words about zeppelins.")
    first.close()
    second = DocumentStore(path)
    assert second.get(info.id).name == "kept.txt"
    assert second.search("zeppelins")[0].document_id == info.id
    second.close()


def test_concurrent_ingest_and_search(store: DocumentStore) -> None:
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for item in range(10):
                store.add_text(f"w{worker}-{item}.txt", f"token{worker}x{item} appears here")
                assert store.search(f"token{worker}x{item}", k=1)
        except BaseException as exc:  # collected for the main thread's assertion
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(store.list_documents()) == 60


def test_chunking_keeps_passages_within_the_limit() -> None:
    text = "First paragraph.\n\n" + "A sentence that goes on. " * 20 + "\n\n" + "y" * 130
    chunks = chunk_text(text, max_chars=100)
    assert all(len(chunk) <= 100 for chunk in chunks)
    assert chunks[0].startswith("First paragraph. A sentence")
    assert "".join(chunks).replace(" ", "").count("y") == 130


def test_query_building_and_media_detection() -> None:
    assert fts_query("What is the total of the invoice?") == '"total" OR "invoice"'
    assert fts_query("what is it?") is None
    assert fts_query('quote " injection') == '"quote" OR "injection"'
    assert detect_media_type("x.bin", b"%PDF-1.7 ...", None) == "application/pdf"
    assert detect_media_type("x", b"hi", "text/html; charset=utf-8") == "text/html"
    assert detect_media_type("notes.md", b"hi", "application/octet-stream") == "text/markdown"
    assert html_text("<p>a</p><p>b &lt; c</p>") == "a\n\nb < c"
    assert markdown_text("## Title\n*x* and __y__") == "Title\n\nx and y"


def test_a_deletion_tells_the_model_to_drop_earlier_prompts(tmp_path: Path) -> None:
    """The daemon passes the batching engine's ``forget_prompts``: cached KV of prompts that
    held a deleted document's passages must not stay reusable."""
    calls: list[str] = []
    store = DocumentStore(tmp_path / "documents.sqlite3", on_delete=lambda: calls.append("forget"))
    try:
        info = store.add_text("notes.txt", "The boiler was serviced in March.")
        with pytest.raises(DocumentNotFoundError):
            store.delete("no-such-document")
        assert calls == []
        store.delete(info.id)
        assert calls == ["forget"]
        assert store.search("boiler", k=1) == []
    finally:
        store.close()
