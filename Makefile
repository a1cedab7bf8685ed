# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test test-jax-without-torch lint fuzz bench conformance venv clean
N ?= 100000

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/seif demo

# The tests use the native ai.seif kernels (and time them in seif_kernel_bench), so `make test`
# builds them (a no-op when up to date).
test: $(STAMP) native native-bench
	$(BIN)/ruff check seif converters runtime tests benchmarks
	SEIF_EXPECT_CUDA=$$(command -v nvcc >/dev/null && echo 1 || echo 0) $(BIN)/python -m pytest

# The JAX extra must work without torch: a second, small venv with only .[jax,dev].
JAX_VENV := .venv-jax
$(JAX_VENV)/.installed: pyproject.toml
	test -x $(JAX_VENV)/bin/python || $(PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(JAX_VENV)/bin/python -m pip install --quiet -e '.[jax,dev]'
	touch $@

test-jax-without-torch: $(JAX_VENV)/.installed
	! $(JAX_VENV)/bin/python -c "import torch" 2>/dev/null
	$(JAX_VENV)/bin/python -m pytest tests/test_jax.py -p no:warnings -rs

# Long-run reader fuzzing: `make fuzz N=1000000` (inputs); reproducers go to tests/fuzz/crashes/.
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzz_reader.py --count $(N)

# Every project backend against the conformance catalogue and the SEIF 1.0 must-pass list.
CONFORMANCE_BACKENDS := numpy torch jax ort-function ort-kernels ort-com-microsoft
conformance: $(STAMP) native
	for b in $(CONFORMANCE_BACKENDS); do \
	  $(BIN)/seif conformance run --backend $$b \
	    --must-pass spec/conformance/must-pass-1.0.txt || exit 1; \
	done

# Benchmarks print ratio tables measured in one run (see benchmarks/README.md).
SIZE_GB ?= 2
bench: $(STAMP)
	$(BIN)/python -m benchmarks --size-gb $(SIZE_GB)

lint: $(STAMP)
	$(BIN)/ruff check seif converters runtime tests benchmarks

clean:
	rm -rf $(VENV) $(JAX_VENV) build *.egg-info .pytest_cache

include runtime/native.mk
