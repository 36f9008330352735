"""The ``smollm2`` preset's Co-LLM parts: the shipped switch head and the math expert, and a demo answer.

The head (``export/smollm2_math_head/switch.onnx``, a few kilobytes) is shipped rather than built
on first use: building it runs the whole pipeline on SmolLM2 (collection, a decoding sweep), which
takes tens of minutes on two cores; ``result.json`` beside it records the run that made it
(``tandem train pipeline --config configs/pipelines/smollm2-math.toml``). The expert GGUF is
assembled from the shipped weights on first use (export.math_expert).

The head was trained on the plain ``Question: ...\\nAnswer:`` format with GSM8K's calculator
annotations, so the preset decodes with ``prompt_style = "plain"``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tandem_core.errors import TandemError

HEAD_DIR = Path(__file__).parent / "smollm2_math_head"
EXPERT_MODEL = "math-expert"
DEMO_SHOTS = 2


class PresetError(TandemError):
    """The shipped SmolLM2 head is missing."""


def shipped_head() -> Path:
    path = HEAD_DIR / "switch.onnx"
    if not path.is_file():
        raise PresetError(f"the SmolLM2 switch head is missing: {path}")
    return path


def demo_prompt() -> tuple[str, Any]:
    """A fixed few-shot GSM8K prompt (train problems) and one held-out problem to answer."""
    from export import gsm8k

    train, held_out = gsm8k.split(gsm8k.load_problems())
    shots = "".join(gsm8k.problem_text(p, p.answer) + "\n\n" for p in train[:DEMO_SHOTS])
    problem = held_out[0]
    return shots + gsm8k.problem_text(problem, "").rstrip(" "), problem


def demo_answer(*, data_dir: Path, audit_key: Any, color: bool, max_tokens: int = 160) -> bool:
    """One SmolLM2 answer with the math expert behind the real gateway; prints it and the audit.

    Returns whether it ran (the answer's correctness is printed, not required: a 135M base often
    reasons wrongly even when every calculation it defers is right).
    """
    from client.assistant import AnswerToken
    from client.audit import AuditLog
    from client.cli_daemon import render_answer
    from client.decoding import CoDecoder, DecodingOptions
    from client.expert import HttpExpert
    from client.policy import Policy
    from client.prompting import Segment
    from client.settings import ExpertSettings, PolicySettings
    from client.switch import OnnxSwitch
    from export import gsm8k
    from export.math_expert import ensure_math_expert
    from export.pipeline import serve_gateway
    from tandem_core.base_model import LlamaModel, smollm2_path

    prompt, problem = demo_prompt()
    print("\nreal base: SmolLM2-135M-Instruct + the math expert (preset smollm2)", file=sys.stderr)
    policy_settings = PolicySettings(
        usage_db=data_dir / "smollm2-usage.sqlite3", audit_log=data_dir / "audit" / "smollm2-audit.jsonl"
    )
    with (
        serve_gateway(ensure_math_expert(), name=EXPERT_MODEL) as url,
        LlamaModel(smollm2_path(), n_ctx=2048, n_threads=2) as base,
    ):
        expert = HttpExpert.from_settings(
            ExpertSettings(url=url, model=EXPERT_MODEL), tokenizer=base.fingerprint
        )
        policy = Policy.from_settings(policy_settings, tokenizer=base)
        audit = AuditLog(policy_settings.audit_log, key=audit_key)
        try:
            decoder = CoDecoder(
                base=base,
                switch=OnnxSwitch.for_base(shipped_head(), base),
                expert=expert,
                policy=policy,
                audit=audit,
                options=DecodingOptions(max_tokens=max_tokens, stop=("\n\nQuestion:",)),
            )
            result = decoder.generate([Segment(prompt)])
        finally:
            expert.close()
            policy.close()
    tokens = [
        AnswerToken(t.token_id, t.text.decode("utf-8", "replace"), t.provenance, t.deferral_probability)
        for t in result.tokens
    ]
    from client.assistant import Answer

    answer = Answer(result.request_id, result.text, tokens, [], "stop", result.prompt_tokens)
    print(f"question: {problem.question}")
    print(f"answer:   {render_answer(answer, color=color)}")
    print("          (marked tokens came from the math expert)")
    print(f"\nwhat left the machine (audit log, request {result.request_id}):")
    from client.assistant import audit_records

    for record in audit_records(policy_settings.audit_log, result.request_id):
        if record.get("kind") == "egress":
            print(
                f"  {'sent' if record.get('sent') else 'DENIED'}: {len(record.get('sent_tokens', []))} tokens"
                f" ending {str(record.get('sent_text', ''))[-40:]!r} -> {record.get('destination')}"
            )
    right = gsm8k.final_answer_is_right(result.text, problem)
    print(
        f"final answer {problem.final_answer}: {'right' if right else 'wrong'}; "
        f"{result.provenance_counts['expert']} of {len(result.tokens)} tokens from the expert"
    )
    return True
