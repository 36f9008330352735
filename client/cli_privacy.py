"""``tandem keys ...`` and ``tandem audit ...``: secrets in the keyring and the audit log.

Secret values are read from stdin or a no-echo prompt, never from the command line (argv is
visible to every user of the machine through ``ps``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import secrets as _random
import sys
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from client.errors import AuditError
from client.secrets import SECRET_ENV_VARS, SecretStore
from client.settings import PolicySettings
from tandem_core.settings import load_settings


def register(subparsers: Any) -> None:
    _register_keys(subparsers)
    _register_audit(subparsers)


def _register_keys(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="store Tandem's secrets (gateway token, audit key, "
                                 "daemon API key) in the OS keyring")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    names = sorted(SECRET_ENV_VARS)

    set_parser = actions.add_parser("set", help="store a secret read from stdin or a prompt")
    set_parser.add_argument("name", choices=names, help="which secret")
    set_parser.add_argument("--generate", action="store_true",
                            help="store a fresh random value instead of reading one")
    set_parser.set_defaults(handler=_keys_set)

    get_parser = actions.add_parser("get", help="show whether a secret is set and where it is read from")
    get_parser.add_argument("name", choices=names, help="which secret")
    get_parser.add_argument("--reveal", action="store_true", help="print the value itself")
    get_parser.set_defaults(handler=_keys_get)

    delete_parser = actions.add_parser("delete", help="remove a secret from the keyring")
    delete_parser.add_argument("name", choices=names, help="which secret")
    delete_parser.set_defaults(handler=_keys_delete)


def _register_audit(subparsers: Any) -> None:
    audit = subparsers.add_parser("audit", help="check and read the log of everything sent to the expert")
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log", type=Path, help="the audit log file (default: audit_log in policy.toml)")
    common.add_argument("--policy", type=Path, help="policy.toml to read audit_log from")

    verify_parser = actions.add_parser("verify", parents=[common],
                                       help="check that no record was edited, removed or reordered")
    verify_parser.set_defaults(handler=_audit_verify)

    show_parser = actions.add_parser("show", parents=[common],
                                     help="show what left the machine for one answer")
    show_parser.add_argument("--request", required=True,
                             help="the answer's request id (`id` in an API reply)")
    show_parser.add_argument("--json", action="store_true", help="print the raw records")
    show_parser.set_defaults(handler=_audit_show)

    summary_parser = actions.add_parser("summary", parents=[common],
                                        help="calls, tokens and bytes sent per day and gateway")
    summary_parser.add_argument("--since", type=_since, help="YYYY-MM-DD or Nd (N days ago)")
    summary_parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    summary_parser.set_defaults(handler=_audit_summary)


def _since(value: str) -> date:
    days = re.fullmatch(r"(\d{1,5})d", value)
    if days:
        return datetime.now(UTC).date() - timedelta(days=int(days.group(1)))
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD or Nd, got {value!r}") from None


def _store() -> SecretStore:
    """The secret store, with the data folder's 0600 key files as the last fallback."""
    from client.settings import ClientSettings

    data_dir = load_settings(ClientSettings, None).daemon.data_dir
    return SecretStore(files_dir=data_dir / "secrets")


def _keys_set(args: argparse.Namespace) -> int:
    if args.generate:
        value = _random.token_hex(32)
    elif sys.stdin.isatty():
        value = getpass.getpass(f"{args.name}: ")
    else:
        value = sys.stdin.read().rstrip("\r\n")
    SecretStore().set(args.name, SecretStr(value))
    print(f"stored {args.name} in the keyring")
    return 0


def _keys_get(args: argparse.Namespace) -> int:
    store = _store()
    if args.reveal:
        print(store.get(args.name).get_secret_value())
        return 0
    status = store.status(args.name)
    if status.source == "missing":
        store.get(args.name)  # raises SecretMissingError, whose message is the fix
    print(f"{args.name}: set (from {status.where()})")
    return 0


def _keys_delete(args: argparse.Namespace) -> int:
    removed = SecretStore().delete(args.name)
    print(f"deleted {args.name} from the keyring" if removed else f"{args.name} was not in the keyring")
    return 0


def _log_path(args: argparse.Namespace) -> Path:
    if args.log is not None:
        return Path(args.log)
    return load_settings(PolicySettings, args.policy).audit_log


def _audit_verify(args: argparse.Namespace) -> int:
    from client.audit import log_files, verify

    path = _log_path(args)
    if not log_files(path):
        raise AuditError(f"no audit log at {path}")
    report = verify(path, key=_store().get("audit-hmac"))
    print(f"ok: {report.records} records in {report.files} file(s) under {path}")
    return 0


def _audit_show(args: argparse.Namespace) -> int:
    from client.audit import format_request, show

    records = show(_log_path(args), args.request)
    if not records:
        raise AuditError(f"no audit records for request {args.request}")
    if args.json:
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    else:
        print(format_request(records))
    return 0


def _audit_summary(args: argparse.Namespace) -> int:
    from client.audit import summary

    rows = summary(_log_path(args), since=args.since)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return 0
    print(f"{'day':<10}  {'gateway':<32} {'calls':>7} {'denied':>7} {'tokens':>9} {'bytes':>10}")
    for row in rows:
        print(f"{row.day:<10}  {row.destination:<32} {row.calls:>7} {row.denied:>7} "
              f"{row.tokens:>9} {row.bytes:>10}")
    return 0
