# make demo: set up, train two small models, average their checkpoints.  make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test fuzz lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/train_and_average.py
	$(BIN)/python examples/train_lm_and_average.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

fuzz: $(STAMP)
	CKPTAVG_FUZZ_CASES=$${CKPTAVG_FUZZ_CASES:-20000} $(BIN)/python -m pytest -q tests/formats/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_average.py
	cd benchmarks && ../$(BIN)/python bench_bn.py

clean:
	rm -rf $(VENV) examples/output benchmarks/data benchmarks/results
