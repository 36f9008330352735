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
from client.errors import SecretMissingError
from client.settings import (
    BaseModelSettings,
    ClientSettings,
    DaemonSettings,
    ExpertSettings,
    PolicySettings,
    SwitchSettings,
)
from tandem_core.errors import ConfigError, TandemError
from tandem_core.settings import load_settings

_STYLES = {"expert": "\x1b[1;34m", "fallback": "\x1b[1;33m", "denied": "\x1b[1;31m"}
_RESET = "\x1b[0m"


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the local assistant: OpenAI-compatible API, "
                                  "documents, web page")
    serve.add_argument("--config", type=Path, help="client.toml (default: built-in settings)")
    serve.add_argument("--host", help="address to listen on (default: daemon.host in client.toml)")
    serve.add_argument("--port", type=int, help="port to listen on (default: daemon.port in client.toml)")
    serve.add_argument("--lock", action="store_true",
                       help="require an API key for every request (created on first use; the page "
                       "asks for it once)")
    serve.set_defaults(handler=_serve)

    ask = subparsers.add_parser("ask", help="answer one question over the local documents")
    ask.add_argument("question", help="the question (quote it)")
    ask.add_argument("--config", type=Path, help="client.toml (default: built-in settings)")
    ask.add_argument("--json", action="store_true",
                     help="print the answer with each token's source and the egress as JSON")
    ask.add_argument("--max-tokens", type=int, help="longest answer in tokens (default: decoding.max_tokens)")
    ask.set_defaults(handler=_ask)

    demo = subparsers.add_parser("demo", help="try it end to end on a small toy model pair",
                                 description="Builds the toy model pair and its switch head "
                                 "(once, then cached), starts a gateway and the assistant, asks a "
                                 "question about a private document, shows which tokens came from "
                                 "the expert and exactly what left the machine, then serves the "
                                 "web page until Ctrl-C.")
    demo.add_argument("--port", type=int, default=8300, help="port of the web page (if busy: any free port)")
    demo.add_argument("--data-dir", type=Path, help="where the demo keeps its data (default: temp)")
    demo.add_argument("--no-wait", action="store_true",
                      help="exit after the checks instead of serving the web page")
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
        from tandem_core.base_model import smollm2_path

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


def secret_store(settings: ClientSettings | None = None) -> Any:
    """The secret store, with ``<data_dir>/secrets`` as the fallback folder for created keys."""
    from client.secrets import SecretStore

    data_dir = (settings or load_settings(ClientSettings, None)).daemon.data_dir
    return SecretStore(files_dir=data_dir / "secrets")


def audit_key(settings: ClientSettings | None = None) -> SecretStr:
    """The audit HMAC key; created on first start (keyring, else a 0600 file), said where."""
    store = secret_store(settings)
    key, created = store.ensure("audit-hmac")
    if created is not None and created.source == "file":
        print(f"tandem: created the audit log's HMAC key in {created.path} (mode 0600; no OS "
              f"keyring on this machine). To move it into a keyring: `tandem keys set audit-hmac "
              f"< {created.path}` and delete the file; or keep it in your secrets manager and pass "
              f"it as TANDEM_AUDIT_HMAC_KEY.", file=sys.stderr)
    elif created is not None:
        print("tandem: created the audit log's HMAC key in the OS keyring (tandem/audit-hmac)",
              file=sys.stderr)
    return key


def gateway_token() -> SecretStr | None:
    from client.secrets import SecretStore

    try:
        return SecretStore().get("gateway")
    except SecretMissingError:
        return None  # a gateway without auth (loopback demo) needs none


def load_runtime(settings: ClientSettings, policy: PolicySettings) -> Runtime:
    base_path, switch_path = model_paths(settings)
    return build_runtime(settings, policy, base_path=base_path, switch_path=switch_path,
                         audit_key=audit_key(settings), gateway_token=gateway_token())


def daemon_services(runtime: Runtime, settings: ClientSettings, *, api_key: SecretStr | None,
                    host: str = "127.0.0.1") -> Any:
    from client.assistant import audit_records
    from client.daemon import LOOPBACK_HOSTS, DaemonServices

    daemon = settings.daemon
    return DaemonServices(
        assistant=runtime.assistant, documents=runtime.documents, model_name=runtime.model_name,
        egress_reader=lambda request_id: audit_records(runtime.audit_path, request_id),
        api_key=api_key, max_upload_bytes=daemon.max_upload_bytes, max_queue=daemon.max_queue,
        max_queue_per_client=daemon.max_queue_per_client, max_parallel=runtime.max_parallel,
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


def api_key_for(host: str, settings: ClientSettings | None = None, *,
                lock: bool = False) -> SecretStr | None:
    """The daemon-api key when one is configured or the daemon is locked; required off loopback.

    ``lock`` (or ``daemon.require_api_key``) creates the key when none exists: in the keyring,
    else in ``<data_dir>/secrets/daemon-api.key`` (0600).
    """
    from client.secrets import missing_message

    store = secret_store(settings)
    if lock or (settings is not None and settings.daemon.require_api_key):
        key, created = store.ensure("daemon-api")
        if created is not None:
            print(f"tandem: created the daemon's API key in {created.where()}; show it with "
                  f"`tandem keys get daemon-api --reveal`", file=sys.stderr)
        return SecretStr(key.get_secret_value())
    try:
        return SecretStr(store.get("daemon-api").get_secret_value())
    except SecretMissingError as exc:
        if is_loopback(host):
            return None
        raise ConfigError(f"refusing to listen on {host} without an API key: "
                          f"{missing_message('daemon-api')}, or start with `tandem serve --lock`"
                          ) from exc


def access_line(api_key: SecretStr | None, settings: ClientSettings | None = None) -> str:
    """The start-up line's plain statement of who may use the daemon."""
    if api_key is None:
        return ("access: OPEN - no API key; any user or process on this machine can list, upload "
                "and ask about the documents (lock it: `tandem serve --lock` or "
                "daemon.require_api_key = true)")
    status = secret_store(settings).status("daemon-api")
    return (f"access: LOCKED - every request needs the daemon-api key (from {status.where()}); "
            f"API clients send `Authorization: Bearer <key>`, the web page asks for it once")


# -- handlers -------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from client.daemon import create_app

    settings, policy = load_client_settings(args.config)
    host = args.host or settings.daemon.host
    port = settings.daemon.port if args.port is None else args.port
    api_key = api_key_for(host, settings, lock=args.lock)  # before loading anything: refuse early
    runtime = load_runtime(settings, policy)
    app = create_app(daemon_services(runtime, settings, api_key=api_key, host=host))
    print(f"tandem: serving {runtime.model_name} on http://{host}:{port}/ | "
          f"{access_line(api_key, settings)}", file=sys.stderr)
    print(f"tandem: {expert_status(runtime)}", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


def expert_status(runtime: Runtime) -> str:
    """One plain line: can the expert gateway be reached right now?"""
    from client.expert import HttpExpert

    expert = getattr(runtime, "expert", None)
    if not isinstance(expert, HttpExpert):
        return "no expert gateway configured: the base model answers alone"
    problem = expert.probe()
    if problem is None:
        return f"expert gateway {expert.destination} is reachable"
    return (f"expert gateway {expert.destination} is UNREACHABLE ({problem}): answers come "
            "from the base model alone and nothing is sent until it is back")


def _ask(args: argparse.Namespace) -> int:
    settings, policy = load_client_settings(args.config)
    from client.assistant import audit_records, describe_egress

    runtime = load_runtime(settings, policy)
    try:
        question = Question(messages=[ChatTurn("user", args.question)],
                            max_tokens=args.max_tokens or settings.decoding.max_tokens,
                            temperature=settings.decoding.temperature)
        answer = runtime.assistant.answer(question)
        disclosure = describe_egress(audit_records(runtime.audit_path, answer.request_id))
    finally:
        runtime.close()
    if args.json:
        print(json.dumps({**answer_json(answer), "what_left": disclosure}, indent=2))
    else:
        print(render_answer(answer, color=sys.stdout.isatty()))
        if answer.passages:
            print("sources: " + ", ".join(p.document_name for p in answer.passages))
        print(egress_line(answer))
        for line in disclosure:
            print(f"  {line}")
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
    """Token provenance and what really left: attempted, delivered and answered calls."""
    egress = answer.egress
    counts = answer.provenance_counts
    line = (f"tokens: {counts['base']} base, {counts['expert']} expert, {counts['fallback']} "
            f"fallback, {counts['denied']} denied | egress: {egress.calls} calls attempted, "
            f"{egress.delivered} delivered, {egress.answered} answered; "
            f"{egress.tokens_delivered} tokens delivered, {egress.denials} denied")
    if egress.calls and not egress.delivered:
        line += (f"\nexpert unreachable: nothing left the machine"
                 f"{' (' + egress.last_error + ')' if egress.last_error else ''}")
    return line


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
                        after=lambda: _demo_real_base(settings))


def run_demo(toy: Any, settings: ClientSettings, policy: PolicySettings, *, gateway_url: str,
             wait: bool, after: Any = None) -> int:
    """Ask the demo question twice: under the given policy, then with ``derived = "send"``.

    The two runs show the trade between privacy and usefulness: by default the invoice's
    numbers stay home, the expert is not asked and the answer is marked double-check; opened,
    the expert computes the sum and the report names the two values that left. ``after`` (the
    real-base answer) runs once both are done.
    """
    from client.daemon import create_app

    data_dir = settings.daemon.data_dir
    print(f"expert gateway: {gateway_url}\ndata and audit log: {data_dir}")
    runs = [("1", f"the policy as configured (derived = {policy.derived!r})", settings, policy)]
    if policy.derived != "send":
        opened_dir = data_dir / "derived-send"
        opened_settings = settings.model_copy(update={"daemon": settings.daemon.model_copy(
            update={"data_dir": opened_dir, "port": 0})})
        opened = policy.model_copy(update={"derived": "send",
                                           "usage_db": opened_dir / "usage.sqlite3",
                                           "audit_log": opened_dir / "audit" / "audit.jsonl"})
        runs.append(("2", 'the policy opened: derived = "send"', opened_settings, opened))
    ok = True
    for number, title, run_settings, run_policy in runs:
        runtime = build_runtime(run_settings, run_policy,
                                base_path=run_settings.base.path or toy.base_gguf,
                                switch_path=run_settings.switch.path,
                                audit_key=_demo_audit_key(run_settings))
        server = _start_daemon(create_app(daemon_services(runtime, run_settings, api_key=None)),
                               run_settings.daemon.port)
        url = server.start()
        print(f"\n=== run {number}: {title} | local daemon {url}/")
        try:
            ok = _demo_session(url, toy, run_policy) and ok
            if wait and number == "1":
                print(f"\nOpen {url}/ to chat with your documents (run 1's policy). "
                      f"Ctrl-C continues with run 2 / stops the demo.")
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
        finally:
            server.stop()
    if after is not None:
        ok = after() and ok
    return 0 if ok else 1


def _demo_real_base(settings: ClientSettings) -> bool:
    """One answer of SmolLM2 with the math expert, after the toy's (export.smollm2_math)."""
    try:
        module = _export_module("smollm2_math")
        return bool(module.demo_answer(data_dir=settings.daemon.data_dir,
                                       audit_key=_demo_audit_key(settings),
                                       color=sys.stdout.isatty()))
    except TandemError as exc:
        print(f"real-base demo skipped: {exc}", file=sys.stderr)
        return True


def _start_daemon(app: Any, port: int) -> Any:
    import socket

    from tandem_core.server import ServerThread

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            port = 0  # the preferred port is busy: take any free one
    return ServerThread(app, host="127.0.0.1", port=port)


def _demo_audit_key(settings: ClientSettings) -> SecretStr:
    try:
        return audit_key(settings)
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
        reply = http.post("/v1/chat/completions", json={
            "model": "tandem", "messages": [{"role": "user", "content": demo["question"]}]})
        reply.raise_for_status()
        body = reply.json()
        records = http.get(f"/v1/egress/{body['id']}").json()["records"]
    return _report(body, records, demo, documents, policy)


def _report(body: dict[str, Any], records: list[dict[str, Any]], demo: dict[str, str],
            documents: list[Path], policy: PolicySettings) -> bool:
    """Print the answer and what left; check the audit log's account against the sent text.

    The claims come from an independent reading of the sent text (document pieces and values
    found in it), and must agree with what the policy recorded as derived.
    """
    from client.assistant import AnswerToken, describe_egress, summarize_egress

    extra = body["tandem"]
    tokens = [AnswerToken(0, t["text"], t["provenance"], t["deferral_probability"])
              for t in extra["tokens"]]
    text = body["choices"][0]["message"]["content"]
    print(f"question: {demo['question']}  (needs numbers from {demo['document']})")
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
    for line in describe_egress(records):
        print(f"  {line}")
    correct = demo["answer"].strip() in text
    double_check = extra["provenance"].get("denied", 0) + extra["provenance"].get("fallback", 0)
    leaked = leaked_private_text(records, documents, min_chars=policy.taint_min_chars,
                                 public=demo["question"])
    values = leaked_values(records, documents)
    recorded = sorted({str(item["value"]) for record in records if record.get("sent")
                       for item in (record.get("privacy") or {}).get("derived_sent", [])})
    if values or leaked:
        what = [f"values {', '.join(values)}"] if values else []
        what += [f"text {leaked!r}"] if leaked else []
        print(f"\ncheck: from private documents, these left the machine: {'; '.join(what)} "
              f"(policy: derived = {policy.derived}); the audit log records "
              f"{', '.join(recorded) or 'no values'}: "
              f"{'agrees' if recorded == values and not leaked else 'DISAGREES'}")
    else:
        print("\ncheck: nothing from a private document (no text, no value) left the machine: yes")
    if policy.derived == "send":
        print(f"check: answer is correct ({demo['answer'].strip()!r}): {'yes' if correct else 'NO'}")
        return correct and not leaked and recorded == values
    print(f"check: the expert was kept from the invoice's numbers; {double_check} answer token(s) "
          f"marked double-check (answer correct: {'yes' if correct else 'no'})")
    return not leaked and not values and not recorded


def leaked_values(records: list[dict[str, Any]], documents: list[Path]) -> list[str]:
    """Whole values of the documents (numbers, dates, IDs, names) found in the sent text."""
    from client.values import PrivateValues, find_values

    values = PrivateValues.of([(path.read_text("utf-8"), path.name) for path in documents])
    found: set[str] = set()
    for record in records:
        if record.get("sent"):
            found.update(value.text for value in find_values(str(record.get("sent_text", "")),
                                                             values))
    return sorted(found)


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
