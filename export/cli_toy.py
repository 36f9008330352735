"""``tandem toy build``: train the toy base/expert pair and print its targets table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem_core.errors import TandemError


class ToyBuildError(TandemError):
    """The toy build was asked for something it cannot do."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    toy = subparsers.add_parser("toy", help="build the small toy base/expert pair the demo and tests use")
    toy_commands = toy.add_subparsers(dest="toy_command", metavar="COMMAND", required=True)
    build = toy_commands.add_parser("build", help="train the toy pair and write it as GGUF")
    build.add_argument("--out", type=Path, default=None,
                       help="output directory (default: the cache used by tests and the demo)")
    build.add_argument("--vocab-from", type=Path, default=None, metavar="MODEL.gguf",
                       help="take the vocabulary of an existing GGUF instead of the built-in one")
    build.add_argument("--seed", type=int, default=0, help="seed of data and training")
    build.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from export.toy import build_toy_pair, ensure_toy_pair
    from export.toy_eval import format_targets

    if args.vocab_from is not None and not args.vocab_from.is_file():
        raise ToyBuildError(f"--vocab-from: no such file: {args.vocab_from}")
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.out is None and args.vocab_from is None and args.seed == 0:
        pair = ensure_toy_pair(progress=progress)
    else:
        out = args.out or Path("toy-out")
        if out.exists() and any(out.iterdir()):
            raise ToyBuildError(f"--out {out} exists and is not empty; choose another directory")
        pair = build_toy_pair(out, seed=args.seed, vocab_from=args.vocab_from, progress=progress)
    print(f"toy pair in {pair.root}")
    print(format_targets(pair.report["targets"]))
    timings = pair.report["timings"]
    print(f"build time: {timings['build_cpu_s']} CPU s, {timings['build_s']} wall s"
          f" (base {timings['base_steps']} steps, expert {timings['expert_steps']} steps)")
    failed = [row["name"] for row in pair.report["targets"] if row["met"] is False]
    if failed:
        print(f"targets NOT met: {', '.join(failed)}")
        return 1
    return 0
