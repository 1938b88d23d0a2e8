# Everything sets itself up: `make train` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
export JAX_PLATFORMS ?= cpu
# Installs take the versions the suite passed with (requirements/lock.txt, made by `make lock`).
# To upgrade: make clean && make test PINS= (the newest versions setup.cfg allows), then make lock.
LOCK := requirements/lock.txt
PINS ?= -c $(LOCK)

.PHONY: train test test-fast install install-test lock clean

$(BIN)/gpt-jax: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PINS) -e '.[dev]'
	touch $@

install: $(BIN)/gpt-jax

# Tests also use libtpu (TPU AOT compiles on this CPU host), lm-eval (the eval extra) and, where a CPU-only torch wheel
# can be had, torch + transformers for the Hugging Face conversion tests (skipped otherwise).
$(VENV)/.test-extras: $(BIN)/gpt-jax
	$(BIN)/pip install -q $(PINS) -e '.[dev,tpu,eval]'
	$(BIN)/pip install -q 'torch==2.13.0+cpu' 'transformers>=4.40' accelerate 2>/dev/null \
	  || echo "note: no CPU-only torch wheel here; the Hugging Face tests will be skipped"
	touch $@

install-test: $(VENV)/.test-extras

# Train the default GPT on the built-in corpus (the Python standard library), then sample.
train: install
	$(BIN)/gpt-jax train --config=configs/default.py --workdir=$(WORKDIR)
	$(BIN)/gpt-jax sample --workdir=$(WORKDIR) --prompt="def main(" --max_new_tokens=100 --num_samples=3

# Two tiers. Fast: unit tests, no process started (about half a minute on 2 cores). End to end:
# training runs, compiles and processes; the multi-process runs last, one at a time, so that a
# loaded machine does not starve their collectives.
FAST := -m "not e2e"
test-fast: install-test
	$(BIN)/python -m pytest -q -n 2 $(FAST) tests

test: test-fast
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "e2e and not multiprocess" tests
	$(BIN)/python -m pytest -q -m multiprocess tests

# Pin what setup.cfg's requirements (with the dev, tpu and eval extras) resolved to in .venv.
lock: install-test
	$(BIN)/python requirements/freeze.py dev tpu eval > $(LOCK).new && mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) runs
