"""The local document store: parse, chunk into passages, index in SQLite FTS5, retrieve.

Documents never leave the machine; retrieved passages enter prompts as private segments.
Text, Markdown, HTML and PDF are accepted. One SQLite connection guarded by a lock keeps the
store safe to share between the daemon's request threads and its model worker.
"""

from __future__ import annotations

import io
import itertools
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from client.errors import (
    DocumentError,
    DocumentNotFoundError,
    DocumentParseError,
    DocumentTooLargeError,
)
from client.parsing import TextExtractor, shared_worker

MEDIA_TYPES = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}
_MEDIA_ALIASES = {"application/xhtml+xml": "text/html", "text/x-markdown": "text/markdown"}

# Words too common to help BM25 pick a passage; dropping them keeps queries small.
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "from", "how",
    "i", "in", "is", "it", "its", "me", "much", "many", "my", "of", "on", "or", "our", "so",
    "than", "that", "the", "their", "them", "then", "there", "these", "this", "to", "was", "we",
    "what", "when", "where", "which", "who", "why", "will", "with", "you", "your",
})
_WORD = re.compile(r"\w+")
_PHRASES_PER_QUERY = 200  # FTS5 parses each query; bounded so a long prompt stays cheap
_CANDIDATE_PASSAGES = 2000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    characters INTEGER NOT NULL,
    passage_count INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(
    text, document_id UNINDEXED, ordinal UNINDEXED, tokenize = 'porter unicode61'
);
"""


@dataclass(frozen=True)
class DocumentInfo:
    """One stored document, as listed by the API."""

    id: str
    name: str
    media_type: str
    size_bytes: int
    characters: int
    passages: int
    created_at: float


@dataclass(frozen=True)
class Repeat:
    """Characters ``[start, end)`` of a text that repeat words of the stored ``document_name``."""

    start: int
    end: int
    document_name: str


@dataclass(frozen=True)
class Passage:
    """A retrieved piece of a document; ``score`` is BM25 (higher is better)."""

    document_id: str
    document_name: str
    ordinal: int
    text: str
    score: float


class DocumentStore:
    """Documents and their passages in one SQLite database with a full-text index."""

    def __init__(self, path: Path, *, max_bytes: int = 10 * 1024 * 1024,
                 passage_chars: int = 600, parser: TextExtractor | None = None,
                 on_delete: Callable[[], None] | None = None) -> None:
        self.path = path
        self._on_delete = on_delete  # drops what the model keeps of earlier prompts
        self._parser = parser
        self.max_bytes = max_bytes
        self.passage_chars = passage_chars
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise DocumentError(f"cannot open the document store {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def ingest(self, name: str, data: bytes, *, media_type: str | None = None) -> DocumentInfo:
        """Parse ``data`` (by media type, else by file name), chunk it and index it."""
        if len(data) > self.max_bytes:
            raise DocumentTooLargeError(
                f"{name} is {len(data)} bytes; the limit is {self.max_bytes} bytes"
            )
        kind = detect_media_type(name, data, media_type)
        # In a worker process with a time limit; the store's lock is not held meanwhile.
        text = (self._parser or shared_worker()).extract(data, kind)
        return self._store(name, kind, len(data), text)

    def add_text(self, name: str, text: str, *, media_type: str = "text/plain") -> DocumentInfo:
        """Index text that is already plain (or Markdown/HTML source)."""
        return self.ingest(name, text.encode("utf-8"), media_type=media_type)

    def list_documents(self) -> list[DocumentInfo]:
        with self._query() as connection:
            rows = connection.execute(
                "SELECT id, name, media_type, size_bytes, characters, passage_count, created_at "
                "FROM documents ORDER BY created_at, id"
            ).fetchall()
        return [DocumentInfo(*row) for row in rows]

    def get(self, document_id: str) -> DocumentInfo:
        with self._query() as connection:
            row = connection.execute(
                "SELECT id, name, media_type, size_bytes, characters, passage_count, created_at "
                "FROM documents WHERE id = ?", (document_id,)
            ).fetchone()
        if row is None:
            raise DocumentNotFoundError(f"no document with id {document_id!r}")
        return DocumentInfo(*row)

    def delete(self, document_id: str) -> None:
        """Remove a document and its passages, so retrieval no longer sees them."""
        with self._query() as connection:
            connection.execute("BEGIN")
            deleted = connection.execute("DELETE FROM documents WHERE id = ?", (document_id,))
            connection.execute("DELETE FROM passages WHERE document_id = ?", (document_id,))
            connection.execute("COMMIT")
        if deleted.rowcount == 0:
            raise DocumentNotFoundError(f"no document with id {document_id!r}")
        if self._on_delete is not None:
            self._on_delete()

    def search(self, question: str, k: int = 1) -> list[Passage]:
        """The ``k`` passages that best match the question's words (BM25), best first."""
        match = fts_query(question)
        if match is None or k <= 0:
            return []
        with self._query() as connection:
            rows = connection.execute(
                "SELECT p.document_id, d.name, p.ordinal, p.text, -bm25(passages) AS score "
                "FROM passages AS p JOIN documents AS d ON d.id = p.document_id "
                "WHERE passages MATCH ? ORDER BY bm25(passages), p.rowid LIMIT ?",
                (match, k),
            ).fetchall()
        return [Passage(row[0], row[1], int(row[2]), row[3], float(row[4])) for row in rows]

    def repeats(self, text: str, *, min_chars: int = 12) -> list[Repeat]:
        """Runs of whole words in ``text`` that repeat a stored document (any of them).

        A run is at least ``min_chars`` characters of consecutive words (case and spacing
        ignored) where each neighbouring pair of words also stands together in some stored
        passage; a single word counts when it alone is that long. FTS5 finds the candidate
        passages with one phrase query per word pair, so the whole store is searched, not only
        the passages retrieved for a question. Pairs chained across two documents still count:
        for privacy, over-marking is the safe side.
        """
        words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)]
        if not words:
            return []
        pairs = {(a[2], b[2]) for a, b in itertools.pairwise(words)
                 if not (a[2] in _STOPWORDS and b[2] in _STOPWORDS)}
        singles = {word for _, _, word in words if len(word) >= min_chars}
        found_pairs, found_singles = self._stored_pairs(pairs, singles)
        repeats: list[Repeat] = []
        index = 0
        while index < len(words):
            end = index
            while end + 1 < len(words) and (words[end][2], words[end + 1][2]) in found_pairs:
                end += 1
            start_char, end_char = words[index][0], words[end][1]
            if end > index and end_char - start_char >= min_chars:
                pair = (words[index][2], words[index + 1][2])
                repeats.append(Repeat(start_char, end_char, found_pairs[pair]))
            elif end == index and words[index][2] in found_singles:
                repeats.append(Repeat(start_char, end_char, found_singles[words[index][2]]))
            index = end + 1
        return repeats

    def _stored_pairs(self, pairs: set[tuple[str, str]], singles: set[str]
                      ) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
        """Which word pairs (and long words) stand in some passage, with that document's name."""
        phrases = [f'"{a} {b}"' for a, b in sorted(pairs)] + [f'"{w}"' for w in sorted(singles)]
        found_pairs: dict[tuple[str, str], str] = {}
        found_singles: dict[str, str] = {}
        for batch in range(0, len(phrases), _PHRASES_PER_QUERY):
            match = " OR ".join(phrases[batch:batch + _PHRASES_PER_QUERY])
            with self._query() as connection:
                rows = connection.execute(
                    "SELECT p.text, d.name FROM passages AS p JOIN documents AS d "
                    "ON d.id = p.document_id WHERE passages MATCH ? LIMIT ?",
                    (match, _CANDIDATE_PASSAGES)).fetchall()
            for passage, name in rows:
                stored = [m.group().lower() for m in _WORD.finditer(passage)]
                for pair in itertools.pairwise(stored):
                    if pair in pairs:
                        found_pairs.setdefault(pair, name)
                for word in stored:
                    if word in singles:
                        found_singles.setdefault(word, name)
        return found_pairs, found_singles

    def _store(self, name: str, media_type: str, size_bytes: int, text: str) -> DocumentInfo:
        chunks = chunk_text(text, max_chars=self.passage_chars)
        if not chunks:
            raise DocumentParseError(f"{name} contains no text")
        info = DocumentInfo(
            id=f"doc_{uuid.uuid4().hex[:16]}", name=name, media_type=media_type,
            size_bytes=size_bytes, characters=len(text), passages=len(chunks),
            created_at=time.time(),
        )
        with self._query() as connection:
            connection.execute("BEGIN")
            connection.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
                (info.id, info.name, info.media_type, info.size_bytes, info.characters,
                 info.passages, info.created_at),
            )
            connection.executemany(
                "INSERT INTO passages (text, document_id, ordinal) VALUES (?, ?, ?)",
                [(chunk, info.id, ordinal) for ordinal, chunk in enumerate(chunks)],
            )
            connection.execute("COMMIT")
        return info

    @contextmanager
    def _query(self) -> Iterator[sqlite3.Connection]:
        """Serialize access and translate sqlite3 failures at this one boundary."""
        with self._lock:
            try:
                yield self._connection
            except sqlite3.Error as exc:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise DocumentError(f"document store failure: {exc}") from exc


def detect_media_type(name: str, data: bytes, declared: str | None) -> str:
    """The media type to parse with: PDF by magic bytes, else declared, else by file suffix."""
    if data.lstrip()[:5] == b"%PDF-":
        return "application/pdf"
    declared_type = (declared or "").split(";")[0].strip().lower()
    declared_type = _MEDIA_ALIASES.get(declared_type, declared_type)
    if declared_type in MEDIA_TYPES.values():
        return declared_type
    suffix = Path(name).suffix.lower()
    if suffix in MEDIA_TYPES:
        return MEDIA_TYPES[suffix]
    if declared_type in ("", "application/octet-stream") or declared_type.startswith("text/"):
        return "text/plain"
    raise DocumentParseError(
        f"unsupported document type {declared_type!r} for {name}: use text, Markdown, HTML or PDF"
    )


def extract_text(data: bytes, media_type: str, *, max_chars: int | None = None) -> str:
    """Plain text of a document of a supported media type, at most ``max_chars`` long.

    Runs in the calling process: the daemon calls it through ``client.parsing``, in a worker
    process with a time limit, so a parser bomb cannot stall the daemon.
    """
    if media_type == "application/pdf":
        text = _pdf_text(data, max_chars)
    else:
        text = _decode_utf8(data)
        if media_type == "text/html":
            text = html_text(text)
        elif media_type == "text/markdown":
            text = markdown_text(text)
    if max_chars is not None and len(text) > max_chars:
        raise DocumentTooLargeError(
            f"the document's text is {len(text)} characters; the limit is {max_chars}")
    return text


def _decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentParseError(f"the document is not UTF-8 text (byte {exc.start})") from exc


def _pdf_text(data: bytes, max_chars: int | None) -> str:
    """Page by page, stopping as soon as the text passes ``max_chars`` (a PDF can expand 1000x)."""
    from pypdf import PdfReader

    pages: list[str] = []
    total = 0
    try:
        reader = PdfReader(io.BytesIO(data))
        for page in reader.pages:
            text = (page.extract_text() or "").strip()
            pages.append(text)
            total += len(text) + 2
            if max_chars is not None and total > max_chars:
                raise DocumentTooLargeError(
                    f"the PDF's text passes the limit of {max_chars} characters "
                    f"by page {len(pages)}")
    except DocumentTooLargeError:
        raise
    except Exception as exc:  # pypdf raises many unrelated types on malformed files
        raise DocumentParseError(f"the PDF could not be read: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(pages)


_SKIPPED = frozenset({"script", "style", "head", "template", "noscript"})
_BLOCKS = frozenset({
    "p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
    "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "title",
})


def html_text(source: str) -> str:
    """Visible text of an HTML page; block elements become paragraph breaks.

    lxml (libxml2's HTML parser, linear time) replaces ``html.parser``, which rescans
    unterminated tags and took seconds on 120 KB of ``<a``.
    """
    from lxml import etree
    from lxml import html as lxml_html

    if not source.strip():
        return ""
    try:
        root = lxml_html.document_fromstring(source)
    except (etree.ParserError, ValueError):
        return ""
    parts: list[str] = []
    skip_depth = 0
    for event, element in etree.iterwalk(root, events=("start", "end")):
        tag = element.tag.lower() if isinstance(element.tag, str) else None  # None: a comment
        if event == "start":
            if tag in _SKIPPED:
                skip_depth += 1
            elif tag in _BLOCKS:
                parts.append("\n\n")
            if skip_depth == 0 and tag is not None and element.text:
                parts.append(element.text)
        else:
            if tag in _SKIPPED:
                skip_depth -= 1
            elif tag in _BLOCKS:
                parts.append("\n\n")
            if skip_depth == 0 and element.tail:
                parts.append(element.tail)
    paragraphs = re.split(r"\n\s*\n", "".join(parts))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def markdown_text(source: str) -> str:
    """Markdown with its markup removed: headings, emphasis, links, images and code fences.

    markdown-it-py (a CommonMark parser with linear-time delimiter handling) replaces a chain
    of regular expressions, one of which was quadratic on runs of ``' *a'``.
    """
    from markdown_it import MarkdownIt

    parts: list[str] = []
    for token in MarkdownIt("commonmark").parse(source):
        if token.type == "inline":
            for child in token.children or ():
                if child.type in ("text", "code_inline", "image"):
                    parts.append(child.content)
                elif child.type in ("softbreak", "hardbreak"):
                    parts.append("\n")
        elif token.type in ("fence", "code_block", "html_block"):
            parts.append(token.content)
        elif token.nesting == -1 and token.block:
            parts.append("\n\n")
    return re.sub(r"\n{3,}", "\n\n", "".join(parts)).strip()


def chunk_text(text: str, *, max_chars: int = 600) -> list[str]:
    """Split text into passages of whole paragraphs (or sentences) of at most ``max_chars``."""
    passages: list[str] = []
    current = ""
    for piece in _pieces(text, max_chars):
        if current and len(current) + 1 + len(piece) > max_chars:
            passages.append(current)
            current = ""
        current = f"{current} {piece}" if current else piece
    if current:
        passages.append(current)
    return passages


def _pieces(text: str, max_chars: int) -> Iterator[str]:
    """Paragraphs with inner whitespace collapsed; overlong ones split at sentences, then words."""
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if not flat:
            continue
        if len(flat) <= max_chars:
            yield flat
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", flat):
            yield from _split_words(sentence, max_chars)


def _split_words(sentence: str, max_chars: int) -> Iterator[str]:
    line = ""
    for word in sentence.split(" "):
        while len(word) > max_chars:
            if line:
                yield line
                line = ""
            yield word[:max_chars]
            word = word[max_chars:]
        if line and len(line) + 1 + len(word) > max_chars:
            yield line
            line = ""
        line = f"{line} {word}" if line else word
    if line:
        yield line


def fts_query(question: str) -> str | None:
    """An FTS5 MATCH expression: the question's distinct content words, any of them."""
    words: list[str] = []
    for word in re.findall(r"\w+", question.lower()):
        if word not in _STOPWORDS and word not in words:
            words.append(word)
    if not words:
        return None
    return " OR ".join(f'"{word}"' for word in words[:64])
