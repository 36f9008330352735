"""The generic pipeline on a small GSM8K slice: SmolLM2 + the cached math expert behind the real gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.pipeline import run_pipeline
from export.pipeline_config import PipelineConfig, load_pipeline_config
from tandem_core.errors import ConfigError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def tiny_config() -> PipelineConfig:
    shipped = load_pipeline_config(REPO / "configs" / "pipelines" / "smollm2-math.toml")
    return shipped.model_copy(
        update={
            "corpus": shipped.corpus.model_copy(
                update={"train_limit": 3, "validation_limit": 2, "sweep_limit": 2, "test_limit": 2}
            ),
            "calibrate": shipped.calibrate.model_copy(update={"rates": (0.1,)}),
            "decode": shipped.decode.model_copy(update={"max_tokens": 6}),
        }
    )


def test_pipeline_runs_and_resumes_on_gsm8k(tmp_path: Path) -> None:
    config = tiny_config()
    out = tmp_path / "run"
    result = run_pipeline(config, out, progress=False)
    assert (out / "switch.onnx").is_file() and (out / "eval.png").is_file()
    assert {row["system"] for row in result["eval"]} == {"base", "expert", "co-llm", "random"}
    expert = next(row for row in result["eval"] if row["system"] == "expert")
    assert expert["remote_calls"] > 0
    manifest = json.loads((out / "data" / "train" / "manifest.json").read_text())
    assert manifest["expert"]["model"] == "math-expert"

    # Interrupted before eval: the rerun does only eval.
    state = json.loads((out / "state.json").read_text())
    collect_info = state["done"]["collect"]
    del state["done"]["eval"]
    (out / "state.json").write_text(json.dumps(state))
    (out / "eval.json").unlink()
    again = run_pipeline(config, out, progress=False)
    assert (out / "eval.json").is_file()
    assert json.loads((out / "state.json").read_text())["done"]["collect"] == collect_info
    assert again["threshold"] == result["threshold"]

    other = config.model_copy(update={"seed": 1})
    with pytest.raises(Exception, match="another configuration"):
        run_pipeline(other, out, progress=False)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[expert]\ngguf = "math-expert"\nurl = "http://x"\n')
    with pytest.raises(ConfigError, match="exactly one"):
        load_pipeline_config(bad)
    bad.write_text('[expert]\ngguf = "x"\n[corpus]\nkinds = "gsm8k"\n')
    with pytest.raises(ConfigError, match="corpus.kinds"):
        load_pipeline_config(bad)


def test_the_toy_pipeline_is_one_configuration(toy_pair) -> None:  # type: ignore[no-untyped-def]
    from export.pipeline import toy_config

    config = toy_config(toy_pair)
    assert config.expert.gguf == str(toy_pair.expert_gguf)
    assert config.corpus.kind == "jsonl" and config.corpus.train_limit == 800
    assert load_pipeline_config(REPO / "configs" / "pipelines" / "toy.toml").corpus.kind == "toy"
