# fastcp: two commands on a fresh machine — `make demo` and `make test`.
PY ?= python3
# Never put the current directory on sys.path: the repo root holds kernels/ (see kernels/__init__.py).
export PYTHONSAFEPATH := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastcp-installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first (a local CPU build here; elsewhere the same pin fetches the CUDA build), then the
# package against that torch: --no-build-isolation builds fastcp._C with the installed torch and
# the constraints file keeps pip from replacing it.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt ninja
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m fastcp.demo --overwrite_output_dir

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_multi_lora.py --quick

clean:
	rm -rf build outputs fastcp/_C*.so
