"""The ``tandem`` command: parse, load settings, call library code, print one-line errors.

Each area registers its own subcommands from a module listed in ``COMMAND_MODULES``; a module
exposes ``register(subparsers)`` and sets ``handler=`` on each parser. Handlers take the parsed
arguments and return an exit code. Heavy imports (torch, llama.cpp) happen inside handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tandem_core.errors import TandemError

DESCRIPTION = (
    "Tandem answers questions over your private documents with a small model that runs on this "
    "machine; for the tokens it is unsure of, it asks a larger expert model on a remote gateway. "
    "Your policy decides what the expert may see, and every token that leaves is written to an "
    "audit log first."
)
EPILOG = "Start with `tandem demo`. `tandem COMMAND --help` describes each command."

COMMAND_MODULES = (  # in the order `tandem --help` lists them: everyday commands first
    "client.cli_daemon",
    "client.cli_privacy",
    "expert_gateway.cli",
    "export.cli_train",
    "export.cli_toy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (for bug reports)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # that area is not part of this installation
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except TandemError as exc:
        if args.debug:
            raise
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
