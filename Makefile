# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test lint fuzz bench venv clean
N ?= 100000

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/seif demo

test: $(STAMP)
	$(BIN)/ruff check seif converters runtime tests benchmarks
	$(BIN)/python -m pytest

# Long-run reader fuzzing: `make fuzz N=1000000` (inputs); reproducers go to tests/fuzz/crashes/.
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzz_reader.py --count $(N)

# Benchmarks print ratio tables measured in one run (see benchmarks/README.md).
SIZE_GB ?= 2
bench: $(STAMP)
	$(BIN)/python -m benchmarks --size-gb $(SIZE_GB)

lint: $(STAMP)
	$(BIN)/ruff check seif converters runtime tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
