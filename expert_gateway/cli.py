"""``tandem gateway serve`` and ``tandem gateway keys add|list|revoke``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from expert_gateway.settings import GatewaySettings, load_gateway_settings
from tandem_core.errors import ConfigError

DEFAULT_CONFIG = Path("configs/gateway.toml")


def register(subparsers: Any) -> None:
    gateway = subparsers.add_parser("gateway", help="run the expert gateway and manage its API keys")
    commands = gateway.add_subparsers(dest="gateway_command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="serve the expert model to Tandem clients over HTTP(S)")
    _config_argument(serve)
    serve.add_argument("--host", help="bind address (overrides server.host)")
    serve.add_argument("--port", type=int, help="TCP port (overrides server.port)")
    serve.set_defaults(handler=serve_command)

    keys = commands.add_parser("keys", help="create, list and revoke the API keys clients use")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = key_commands.add_parser("add", help="create a key and print its secret once")
    _config_argument(add)
    add.add_argument("name", help="who or what the key is for")
    add.add_argument("--requests-per-minute", type=_positive,
                     help="this key's request quota (default: auth.requests_per_minute)")
    add.add_argument("--tokens-per-day", type=_positive,
                     help="this key's daily token quota (default: auth.tokens_per_day)")
    add.set_defaults(handler=keys_add_command)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    _config_argument(listing)
    listing.set_defaults(handler=keys_list_command)
    revoke = key_commands.add_parser("revoke", help="revoke a key by id or name")
    _config_argument(revoke)
    revoke.add_argument("key", help="key id (k_...) or name")
    revoke.set_defaults(handler=keys_revoke_command)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help=f"gateway.toml (default: {DEFAULT_CONFIG} when it exists)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _settings(args: argparse.Namespace, **server: object) -> GatewaySettings:
    path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    settings = load_gateway_settings(path)
    overrides = {name: value for name, value in server.items() if value is not None}
    if overrides:
        updated = settings.server
        try:
            settings = GatewaySettings.model_validate(
                {**settings.model_dump(), "server": {**updated.model_dump(), **overrides}})
        except ValidationError as exc:
            raise ConfigError(f"invalid --host/--port: {exc.errors()[0]['msg']}") from exc
    return settings


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from expert_gateway.app import create_app

    settings = _settings(args, host=args.host, port=args.port)
    server = settings.server
    ssl: dict[str, Any] = {}
    if server.tls_certfile is not None and server.tls_keyfile is not None:
        ssl = {"ssl_certfile": str(server.tls_certfile), "ssl_keyfile": str(server.tls_keyfile)}
    uvicorn.run(create_app(settings), host=server.host, port=server.port, log_level=server.log_level,
                **ssl)
    return 0


def _store(args: argparse.Namespace) -> Any:
    from expert_gateway.keys import KeyStore

    return KeyStore(_settings(args).auth.keys_file)


def keys_add_command(args: argparse.Namespace) -> int:
    key, secret = _store(args).add(args.name, requests_per_minute=args.requests_per_minute,
                                   tokens_per_day=args.tokens_per_day)
    print(f"created {key.key_id} ({key.name}); the key is shown only now:")
    print(secret)
    return 0


def keys_list_command(args: argparse.Namespace) -> int:
    keys = _store(args).load()
    if not keys:
        print("no keys")
        return 0
    for key in keys:
        state = "revoked" if key.revoked else "active"
        rpm = key.requests_per_minute or "default"
        tpd = key.tokens_per_day or "default"
        print(f"{key.key_id}  {state:7}  {key.created}  rpm={rpm} tokens/day={tpd}  {key.name}")
    return 0


def keys_revoke_command(args: argparse.Namespace) -> int:
    key = _store(args).revoke(args.key)
    print(f"revoked {key.key_id} ({key.name})")
    return 0
