# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF := npx --yes @bufbuild/buf@1.75.0
ARGS ?=

.PHONY: install serve test proto lint format clean soak bench bench-peers

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Byte-compiled first: where PYTHONDONTWRITEBYTECODE is set, each process would compile the
# gateway's source again as it imports it, 0.3 s of CPU for every worker (re)started.
COMPILE := $(PY) -m compileall -q gateway clients

serve: $(STAMP)
	$(COMPILE)
	$(VENV)/bin/image-gateway serve $(ARGS)

# Two test processes (pytest-xdist): most tests wait on real servers rather than compute, and
# the suite takes about half as long. ARGS="-n 0" runs it in one.
test: $(STAMP)
	$(COMPILE) tests
	$(PY) -m pytest -n 2 $(ARGS)

proto: $(STAMP)
	$(PY) -m clients.codegen

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gateway clients tests benchmarks
	$(BUF) lint

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

soak: $(STAMP)
	$(PY) benchmarks/soak.py $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(ARGS)

PEERS := benchmarks/.venv-peers
$(PEERS)/bin/mlserver:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet mlserver==1.7.1 opencv-python-headless numpy

bench-peers: $(STAMP) $(PEERS)/bin/mlserver
	$(PY) benchmarks/peers/run.py $(ARGS)
