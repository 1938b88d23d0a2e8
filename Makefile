# Everything sets itself up: `make train` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
export JAX_PLATFORMS ?= cpu

.PHONY: train test sample install clean

$(BIN)/gpt-jax: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/gpt-jax

# Train the default GPT on the built-in corpus (the Python standard library), then sample.
train: install
	$(BIN)/gpt-jax train --config=configs/default.py --workdir=$(WORKDIR)
	$(BIN)/gpt-jax sample --workdir=$(WORKDIR) --prompt="def main(" --max_new_tokens=200

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
