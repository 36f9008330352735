"""``tandem train collect|fit|calibrate|pipeline``, ``tandem export onnx`` and ``tandem eval``.

Thin: parse, call export/ library code, print. torch and llama.cpp are imported by the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tandem_core.errors import ConfigError


def register(subparsers: Any) -> None:
    train = subparsers.add_parser("train", help="train a switch head: collect data, fit, calibrate")
    train_commands = train.add_subparsers(dest="train_command", metavar="STEP", required=True)
    _register_collect(train_commands)
    _register_fit(train_commands)
    _register_calibrate(train_commands)
    _register_pipeline(train_commands)
    export = subparsers.add_parser("export", help="export a trained switch head for the client")
    export_commands = export.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    _register_onnx(export_commands)
    _register_eval(subparsers)


# --- shared options --------------------------------------------------------------------------------


def _add_models(parser: argparse.ArgumentParser, *, expert_required: bool = True) -> None:
    parser.add_argument("--base", required=True, help="base GGUF file, or 'smollm2' for SmolLM2-135M")
    expert = parser.add_mutually_exclusive_group(required=expert_required)
    expert.add_argument("--gateway", metavar="URL", help="URL of the expert gateway")
    expert.add_argument("--expert-gguf", type=Path, help="run this expert GGUF in-process instead")
    parser.add_argument("--expert-model", default="toy-expert", help="expert model name at the gateway")
    parser.add_argument("--prompt-style", choices=("auto", "plain", "chat"), default="auto",
                        help="chat: the base's chat template; auto: chat when the base has one")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context window for the models")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for llama.cpp")
    parser.add_argument("--policy", type=Path, help="policy.toml: what may be sent to the expert")
    parser.add_argument("--audit-log", type=Path, help="audit log for egress (default: by policy or --out)")
    parser.add_argument("--limit", type=int, help="use only the first N corpus lines")


def base_path(value: str) -> Path:
    if value == "smollm2":
        from tandem_core.base_model import smollm2_path

        return smollm2_path()
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"base model not found: {path}")
    return path


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    return path


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text}") from exc
    if not rates or any(not 0.0 <= rate <= 1.0 for rate in rates):
        raise argparse.ArgumentTypeError("rates must lie in [0, 1]")
    return rates


# --- train collect ---------------------------------------------------------------------------------


def _register_collect(commands: Any) -> None:
    parser = commands.add_parser("collect", help="run both models over a corpus, store what training needs")
    parser.add_argument("--corpus", type=Path, required=True, help='JSONL of {"prompt", "answer"}')
    parser.add_argument("--out", type=Path, required=True, help="output directory (a rerun resumes)")
    parser.add_argument("--shard-size", type=int, default=64, help="examples per shard")
    _add_models(parser)
    parser.set_defaults(handler=collect_handler)


def collect_handler(args: argparse.Namespace) -> int:
    from export.collect import CollectPlan, EgressSetup, run_collect

    plan = CollectPlan(corpus=_existing(args.corpus, "corpus"), out=args.out, limit=args.limit,
                       shard_size=args.shard_size, prompt_style=args.prompt_style)
    manifest = run_collect(plan, base_path=base_path(args.base), gateway_url=args.gateway,
                           expert_model=args.expert_model, expert_gguf=args.expert_gguf,
                           egress=EgressSetup(args.policy, args.audit_log), n_ctx=args.n_ctx,
                           n_threads=args.threads)
    print(json.dumps(manifest["counts"]))
    return 0


# --- train fit -------------------------------------------------------------------------------------


def _register_fit(commands: Any) -> None:
    parser = commands.add_parser("fit", help="train the switch head on collected data")
    parser.add_argument("--data", type=Path, required=True, help="directory written by `train collect`")
    parser.add_argument("--validation-data", type=Path, help="collected validation data (default: split)")
    parser.add_argument("--out", type=Path, required=True, help="head file to write (head.pt)")
    parser.add_argument("--head", choices=("linear", "mlp"), default="linear",
                        help="linear: the paper's head; mlp: one hidden layer, plus base features")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--init-epochs", type=int, default=200, help="weak-supervision epochs")
    parser.add_argument("--epochs", type=int, default=300, help="marginal-likelihood epochs")
    parser.add_argument("--lr", type=float, default=0.02, help="learning rate")
    parser.set_defaults(handler=fit_handler)


def fit_handler(args: argparse.Namespace) -> int:
    from export.train import FitConfig, fit_command, format_report

    config = FitConfig(head_type=args.head, seed=args.seed, init_epochs=args.init_epochs,
                       marginal_epochs=args.epochs, learning_rate=args.lr)
    report = fit_command(args.data, args.out, config, validation_dir=args.validation_data)
    print(format_report(report))
    return 0


# --- train calibrate -------------------------------------------------------------------------------


def _register_calibrate(commands: Any) -> None:
    parser = commands.add_parser("calibrate", help="choose the deferral threshold")
    parser.add_argument("--head", type=Path, required=True, help="head.pt from `train fit`")
    parser.add_argument("--data", type=Path, required=True, help="collected validation data")
    parser.add_argument("--corpus", type=Path, help="validation corpus for the decoding sweep")
    parser.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    parser.add_argument("--png", type=Path, help="plot of accuracy against deferral")
    parser.add_argument("--rates", type=_rates, help="target deferral rates, e.g. 0.05,0.1,0.2")
    parser.add_argument("--pick", choices=("accuracy", "max-deferral"), default="accuracy",
                        help="the most accurate threshold (within --max-deferral when given); "
                        "max-deferral requires --max-deferral")
    parser.add_argument("--max-deferral", type=float, help="largest acceptable share of deferred tokens")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length cap in the sweep")
    _add_models(parser, expert_required=False)
    parser.set_defaults(handler=calibrate_handler)


def calibrate_handler(args: argparse.Namespace) -> int:
    from export.calibrate import DEFAULT_RATES, format_sweep
    from export.evaluate import DecodingSetup, run_calibration

    setup = None
    if args.corpus is not None:
        if args.gateway is None and args.expert_gguf is None:
            raise ConfigError("the decoding sweep needs an expert: --gateway URL or --expert-gguf FILE")
        setup = DecodingSetup(base_gguf=base_path(args.base), gateway_url=args.gateway,
                              expert_gguf=args.expert_gguf, expert_model=args.expert_model,
                              prompt_style=args.prompt_style, n_ctx=args.n_ctx, n_threads=args.threads,
                              policy_file=args.policy, audit_log=args.audit_log,
                              max_tokens=args.max_tokens)
    table = run_calibration(args.head, args.data, out=args.out, png=args.png,
                            rates=args.rates or DEFAULT_RATES, corpus=args.corpus, setup=setup,
                            rule=args.pick, max_deferral=args.max_deferral, limit=args.limit)
    print(json.dumps(table["quantile_thresholds"]))
    if table["sweep"]:
        from export.calibrate import SweepPoint

        print(format_sweep([SweepPoint(**point) for point in table["sweep"]]))
    print(f"chosen: {json.dumps(table['chosen'])}")
    return 0


# --- train pipeline --------------------------------------------------------------------------------


def _register_pipeline(commands: Any) -> None:
    parser = commands.add_parser("pipeline", help="collect, fit, calibrate, export, eval for any pair "
                                 "(resumable); without --config, the toy pair")
    parser.add_argument("--config", type=Path, help="pipeline TOML (see configs/pipelines/)")
    parser.add_argument("--out", type=Path,
                        help="directory for every artifact (default for the toy: the cache)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the toy pipeline (a config sets its own)")
    parser.set_defaults(handler=pipeline_handler)
    expert = commands.add_parser("math-expert", help="train the math expert (SmolLM2 vocabulary) with torch")
    from export.math_train import add_arguments

    add_arguments(expert)
    expert.set_defaults(handler=math_expert_handler)


def pipeline_handler(args: argparse.Namespace) -> int:
    from export.pipeline import format_result_table, format_targets, run_pipeline, run_toy_pipeline
    from export.pipeline_config import load_pipeline_config

    if args.config is None:
        result = run_toy_pipeline(out=args.out, seed=args.seed)
        print(format_targets(result))
        print(f"switch head: {result['switch_onnx']}")
        return 0 if result["targets_met"] else 1
    if args.out is None:
        raise ConfigError("--config needs --out: the folder for the run (rerun with the same to resume)")
    config = load_pipeline_config(_existing(args.config, "pipeline config"))
    result = run_pipeline(config, args.out)
    print(format_result_table(result))
    print(f"switch head: {result['switch_onnx']} (threshold {result['threshold']:.4f})")
    return 0


def math_expert_handler(args: argparse.Namespace) -> int:
    import sys

    from export.math_train import run

    argv = sys.argv[sys.argv.index("math-expert") + 1 :] if "math-expert" in sys.argv else []
    return run(args, argv)


# --- export onnx -----------------------------------------------------------------------------------


def _register_onnx(commands: Any) -> None:
    parser = commands.add_parser("onnx", help="export a head to ONNX with metadata and a parity check")
    parser.add_argument("--head", type=Path, required=True, help="head.pt from `train fit`")
    parser.add_argument("--out", type=Path, required=True, help="switch.onnx to write")
    parser.add_argument("--calibration", type=Path, help="calibration JSON (thresholds, chosen one)")
    parser.add_argument("--threshold", type=float, help="default threshold (overrides calibration)")
    parser.add_argument("--base", type=Path, help="base GGUF (mlp heads compute features from it)")
    parser.set_defaults(handler=onnx_handler)


def onnx_handler(args: argparse.Namespace) -> int:
    from export.onnx_export import export_command

    report = export_command(args.head, args.out, calibration_path=args.calibration,
                            threshold=args.threshold, base_gguf=args.base)
    print(f"wrote {report.path} ({report.head_type}, threshold {report.threshold:.4f}); parity max abs "
          f"diff {report.parity_max_abs_diff:.2e} on {report.parity_inputs} random inputs")
    return 0


# --- eval ------------------------------------------------------------------------------------------


def _register_eval(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="compare base alone, expert alone, Co-LLM and random "
                                   "deferral on a corpus")
    parser.add_argument("--corpus", type=Path, required=True, help='JSONL of {"prompt", "answer"}')
    parser.add_argument("--switch", type=Path, required=True, help="switch.onnx")
    parser.add_argument("--threshold", type=float, help="override the head's threshold")
    parser.add_argument("--json", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--png", type=Path, help="bar chart of the results")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length cap")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-deferral baseline")
    _add_models(parser)
    parser.set_defaults(handler=eval_handler)


def eval_handler(args: argparse.Namespace) -> int:
    from export.evaluate import DecodingSetup, evaluate_command, format_table

    setup = DecodingSetup(base_gguf=base_path(args.base), gateway_url=args.gateway,
                          expert_gguf=args.expert_gguf, expert_model=args.expert_model,
                          prompt_style=args.prompt_style, n_ctx=args.n_ctx, n_threads=args.threads,
                          policy_file=args.policy, audit_log=args.audit_log, max_tokens=args.max_tokens)
    results = evaluate_command(_existing(args.corpus, "corpus"), _existing(args.switch, "switch head"),
                               setup=setup, json_out=args.json, png=args.png, threshold=args.threshold,
                               limit=args.limit, seed=args.seed)
    print(format_table(results))
    return 0
