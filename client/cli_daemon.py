"""``tandem serve``, ``tandem ask`` and ``tandem demo``: the daemon and the assistant from the shell.

``serve`` and ``ask`` load the same runtime (``client.assistant.build_runtime``); ``ask`` answers
in process without HTTP. ``demo`` is what ``make demo`` runs: toy pair, trained head, gateway,
daemon, sample documents, one arithmetic question, and a check of what left the machine.
The toy pair and its head come from ``export/`` (imported inside the functions that need them,
so a client-only installation can still serve SmolLM2 or any GGUF).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets as _random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from client.assistant import Answer, ChatTurn, Question, Runtime, build_runtime
from client.errors import ConfigError, SecretMissingError, TandemError
from client.settings import (
    BaseModelSettings,
    ClientSettings,
    DaemonSettings,
    ExpertSettings,
    PolicySettings,
    SwitchSettings,
    load_settings,
)

_STYLES = {"expert": "\x1b[1;34m", "fallback": "\x1b[1;33m", "denied": "\x1b[1;31m"}
_RESET = "\x1b[0m"


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the local daemon (OpenAI-compatible API + web page)")
    serve.add_argument("--config", type=Path, help="client.toml (default: built-in settings)")
    serve.add_argument("--host", help="override daemon.host")
    serve.add_argument("--port", type=int, help="override daemon.port")
    serve.set_defaults(handler=_serve)

    ask = subparsers.add_parser("ask", help="answer one question over the local documents")
    ask.add_argument("question", help="the question")
    ask.add_argument("--config", type=Path, help="client.toml (default: built-in settings)")
    ask.add_argument("--json", action="store_true", help="print the answer as JSON")
    ask.add_argument("--max-tokens", type=int, help="answer length cap")
    ask.set_defaults(handler=_ask)

    demo = subparsers.add_parser("demo", help="the end-to-end demo on the toy model pair")
    demo.add_argument("--port", type=int, default=8300, help="daemon port (busy: any free port)")
    demo.add_argument("--data-dir", type=Path, help="where the demo keeps its data (default: temp)")
    demo.add_argument("--no-wait", action="store_true", help="exit after the checks (tests, CI)")
    demo.set_defaults(handler=_demo)


# -- settings and runtime ---------------------------------------------------------------------

def load_client_settings(path: Path | None) -> tuple[ClientSettings, PolicySettings]:
    settings = load_settings(ClientSettings, path)
    policy_path = settings.daemon.policy_config
    if policy_path is not None and not policy_path.is_absolute() and path is not None \
            and not policy_path.exists():
        policy_path = path.parent / policy_path  # relative to client.toml when not to the cwd
    return settings, load_settings(PolicySettings, policy_path)


def model_paths(settings: ClientSettings) -> tuple[Path, Path | None]:
    """The base GGUF and the switch head for the configured preset."""
    preset = settings.base.preset
    if preset == "path":
        if settings.base.path is None:
            raise ConfigError("base.preset is 'path' but base.path is not set")
        return settings.base.path, settings.switch.path
    if preset == "smollm2":
        from client.base_model import smollm2_path

        # Default head: the shipped one trained with the math expert (export.smollm2_math).
        switch = settings.switch.path or _export_module("smollm2_math").shipped_head()
        return settings.base.path or smollm2_path(), switch
    toy = _toy_pair()
    if settings.switch.path is not None:
        return settings.base.path or toy.base_gguf, settings.switch.path
    return settings.base.path or toy.base_gguf, _toy_head(toy)


def _export_module(name: str) -> Any:
    """A module of the offline ``export`` package, which the client itself never needs.

    Imported by name: only the toy preset and the demo use it, and it needs the train extra.
    """
    import importlib

    try:
        return importlib.import_module(f"export.{name}")
    except ImportError as exc:
        raise ConfigError("the toy pair needs the export package and the train extra "
                          "(pip install 'tandem[train]'); or set base.path and switch.path") from exc


def _toy_pair() -> Any:
    print("tandem: preparing the toy model pair (built once, then cached)...", file=sys.stderr)
    return _export_module("toy").ensure_toy_pair()


def _toy_head(toy: Any) -> Path:
    print("tandem: preparing the trained switch head (built once, then cached)...", file=sys.stderr)
    return Path(_export_module("pipeline").ensure_toy_head(toy, progress=True))


def audit_key() -> SecretStr:
    from client.secrets import SecretStore

    return SecretStore().get_or_create("audit-hmac")


def gateway_token() -> SecretStr | None:
    from client.secrets import SecretStore

    try:
        return SecretStore().get("gateway")
    except SecretMissingError:
        return None  # a gateway without auth (loopback demo) needs none


def load_runtime(settings: ClientSettings, policy: PolicySettings) -> Runtime:
    base_path, switch_path = model_paths(settings)
    return build_runtime(settings, policy, base_path=base_path, switch_path=switch_path,
                         audit_key=audit_key(), gateway_token=gateway_token())


def daemon_services(runtime: Runtime, settings: ClientSettings, *, api_key: SecretStr | None,
                    host: str = "127.0.0.1") -> Any:
    from client.assistant import audit_records
    from client.daemon import LOOPBACK_HOSTS, DaemonServices

    daemon = settings.daemon
    return DaemonServices(
        assistant=runtime.assistant, documents=runtime.documents, model_name=runtime.model_name,
        egress_reader=lambda request_id: audit_records(runtime.audit_path, request_id),
        api_key=api_key, max_upload_bytes=daemon.max_upload_bytes, max_queue=daemon.max_queue,
        max_queue_per_client=daemon.max_queue_per_client,
        trusted_hosts=LOOPBACK_HOSTS if is_loopback(host) else None,
        default_max_tokens=settings.decoding.max_tokens,
        default_temperature=settings.decoding.temperature, on_close=[runtime.close])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def api_key_for(host: str) -> SecretStr | None:
    """The daemon-api key when one is configured; required for any non-loopback bind."""
    from client.secrets import SecretStore, missing_message

    try:
        return SecretStore().get("daemon-api")
    except SecretMissingError as exc:
        if is_loopback(host):
            return None
        raise ConfigError(f"refusing to listen on {host} without an API key: "
                          f"{missing_message('daemon-api')}") from exc


# -- handlers -------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from client.daemon import create_app

    settings, policy = load_client_settings(args.config)
    host = args.host or settings.daemon.host
    port = settings.daemon.port if args.port is None else args.port
    api_key = api_key_for(host)  # before loading anything: refuse early
    runtime = load_runtime(settings, policy)
    app = create_app(daemon_services(runtime, settings, api_key=api_key, host=host))
    print(f"tandem: serving {runtime.model_name} on http://{host}:{port}/", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


def _ask(args: argparse.Namespace) -> int:
    settings, policy = load_client_settings(args.config)
    runtime = load_runtime(settings, policy)
    try:
        question = Question(messages=[ChatTurn("user", args.question)],
                            max_tokens=args.max_tokens or settings.decoding.max_tokens,
                            temperature=settings.decoding.temperature)
        answer = runtime.assistant.answer(question)
    finally:
        runtime.close()
    if args.json:
        print(json.dumps(answer_json(answer), indent=2))
    else:
        print(render_answer(answer, color=sys.stdout.isatty()))
        if answer.passages:
            print("sources: " + ", ".join(p.document_name for p in answer.passages))
        print(egress_line(answer))
    return 0


def answer_json(answer: Answer) -> dict[str, Any]:
    from client.openai_api import tandem_extra

    return {"answer": answer.text, "finish_reason": answer.finish_reason, **tandem_extra(answer)}


def render_answer(answer: Answer, *, color: bool) -> str:
    """The answer with expert tokens marked: colours on a terminal, ``[expert:...]`` otherwise."""
    runs: list[tuple[str, str]] = []  # (provenance, text), neighbours of one provenance joined
    for token in answer.tokens:
        if runs and runs[-1][0] == token.provenance:
            runs[-1] = (token.provenance, runs[-1][1] + token.text)
        else:
            runs.append((token.provenance, token.text))
    parts = []
    for provenance, text in runs:
        if provenance == "base":
            parts.append(text)
        elif color:
            parts.append(f"{_STYLES[provenance]}{text}{_RESET}")
        else:
            parts.append(f"[{provenance}:{text}]")
    return "".join(parts)


def egress_line(answer: Answer) -> str:
    egress = answer.egress
    counts = answer.provenance_counts
    return (f"tokens: {counts['base']} base, {counts['expert']} expert, {counts['fallback']} "
            f"fallback, {counts['denied']} denied | egress: {egress.calls} calls, "
            f"{egress.tokens_sent} tokens sent, {egress.denials} denied")


# -- the demo ------------------------------------------------------------------------------------

def _demo(args: argparse.Namespace) -> int:
    serve_gateway = _export_module("pipeline").serve_gateway
    toy = _toy_pair()
    head = _toy_head(toy)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tandem-demo-"))
    with serve_gateway(toy.expert_gguf) as gateway_url:
        settings = ClientSettings(
            base=BaseModelSettings(preset="toy", path=toy.base_gguf, n_ctx=512),  # its training context
            switch=SwitchSettings(path=head),
            expert=ExpertSettings(url=gateway_url, model="toy-expert"),
            daemon=DaemonSettings(data_dir=data_dir, port=args.port),
        )
        policy = PolicySettings(usage_db=data_dir / "usage.sqlite3",
                                audit_log=data_dir / "audit" / "audit.jsonl")
        return run_demo(toy, settings, policy, gateway_url=gateway_url, wait=not args.no_wait,
                        after=lambda: _demo_real_base(data_dir))


def run_demo(toy: Any, settings: ClientSettings, policy: PolicySettings, *, gateway_url: str,
             wait: bool, after: Any = None) -> int:
    from client.daemon import create_app

    runtime = build_runtime(settings, policy, base_path=settings.base.path or toy.base_gguf,
                            switch_path=settings.switch.path, audit_key=_demo_audit_key())
    server = _start_daemon(create_app(daemon_services(runtime, settings, api_key=None)),
                           settings.daemon.port)
    try:
        url = server.start()
        print(f"expert gateway: {gateway_url}\nlocal daemon:   {url}/\n"
              f"data and audit log: {settings.daemon.data_dir}")
        ok = _demo_session(url, toy, policy)
        if after is not None:
            ok = after() and ok
        if wait:
            print(f"\nOpen {url}/ to chat with your documents. Ctrl-C stops the demo.")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0 if ok else 1
    finally:
        server.stop()


def _demo_real_base(data_dir: Path) -> bool:
    """One answer of SmolLM2 with the math expert, after the toy's (export.smollm2_math)."""
    try:
        module = _export_module("smollm2_math")
        return bool(module.demo_answer(data_dir=data_dir, audit_key=_demo_audit_key(),
                                       color=sys.stdout.isatty()))
    except TandemError as exc:
        print(f"real-base demo skipped: {exc}", file=sys.stderr)
        return True


def _start_daemon(app: Any, port: int) -> Any:
    import socket

    from client.daemon import ServerThread

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            port = 0  # the preferred port is busy: take any free one
    return ServerThread(app, host="127.0.0.1", port=port)


def _demo_audit_key() -> SecretStr:
    try:
        return audit_key()
    except (SecretMissingError, ConfigError):
        # No usable keyring (a bare container): sign this demo's log with a one-off key.
        key = _random.token_hex(32)
        os.environ["TANDEM_AUDIT_HMAC_KEY"] = key
        print("note: no OS keyring; this demo's audit log is signed with a one-off key",
              file=sys.stderr)
        return SecretStr(key)


def _demo_session(url: str, toy: Any, policy: PolicySettings) -> bool:
    import httpx

    questions = json.loads(Path(toy.demo_questions_json).read_text())
    documents = sorted(Path(toy.documents_dir).iterdir())
    with httpx.Client(base_url=url, timeout=300) as http:
        for path in documents:
            reply = http.post("/v1/documents", files={"file": (path.name, path.read_bytes())})
            reply.raise_for_status()
        print(f"ingested {len(documents)} private documents: "
              f"{', '.join(path.name for path in documents)}")
        demo = questions[0]
        print(f"\nquestion: {demo['question']}  (needs numbers from {demo['document']})")
        reply = http.post("/v1/chat/completions", json={
            "model": "tandem", "messages": [{"role": "user", "content": demo["question"]}]})
        reply.raise_for_status()
        body = reply.json()
        records = http.get(f"/v1/egress/{body['id']}").json()["records"]
    return _report(body, records, demo, documents, policy)


def _report(body: dict[str, Any], records: list[dict[str, Any]], demo: dict[str, str],
            documents: list[Path], policy: PolicySettings) -> bool:
    from client.assistant import AnswerToken, summarize_egress

    extra = body["tandem"]
    tokens = [AnswerToken(0, t["text"], t["provenance"], t["deferral_probability"])
              for t in extra["tokens"]]
    text = body["choices"][0]["message"]["content"]
    print(f"answer:   {render_answer(_as_answer(text, tokens), color=sys.stdout.isatty())}")
    print("          (marked tokens came from the expert; fallback/denied ones: double-check)")
    print(f"provenance: {extra['provenance']}")
    print(f"\nwhat left the machine (audit log, request {body['id']}):")
    for record in records:
        if record.get("kind") == "egress":
            verdict = "sent" if record.get("sent") else "DENIED " + record["decision"]["reason"]
            print(f"  {verdict}: {len(record.get('sent_tokens', []))} tokens "
                  f"{record.get('sent_text', '')!r} -> {record.get('destination')}")
    summary = summarize_egress(records)
    print(f"  total: {summary.calls} calls, {summary.tokens_sent} tokens")
    correct = demo["answer"].strip() in text
    leaked = leaked_private_text(records, documents, min_chars=policy.taint_min_chars,
                                 public=demo["question"])
    print(f"\ncheck: answer is correct ({demo['answer'].strip()!r}): {'yes' if correct else 'NO'}")
    print(f"check: no private document text left the machine: "
          f"{'yes' if not leaked else 'NO: ' + repr(leaked)}")
    return correct and not leaked


def _as_answer(text: str, tokens: list[Any]) -> Answer:
    return Answer("demo", text, tokens, [], "stop", 0)


def leaked_private_text(records: list[dict[str, Any]], documents: list[Path], *,
                        min_chars: int, public: str = "") -> str:
    """A piece of a document (``min_chars`` long) found in sent text, or ''.

    Pieces the user typed too (``public``, the question) are theirs to send, not leaks.
    """
    sent = [str(record.get("sent_text", "")) for record in records if record.get("sent")]
    for path in documents:
        private = " ".join(path.read_text("utf-8").split())
        for start in range(0, max(1, len(private) - min_chars + 1)):
            piece = private[start:start + min_chars]
            if piece not in public and any(piece in text for text in sent):
                return piece
    return ""
