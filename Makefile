# raydir developer entry points. Each target creates .venv when missing and installs the
# pinned versions from constraints.txt (tested together on Python 3.11, CPU torch).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raydir-installed
EXTRAS ?= dev,text,vision
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps -c constraints.txt imbreg smogn
	touch $(STAMP)

install: $(STAMP)

# The whole suite: unit tests, Ray Data / Ray Train / MLflow integration tests.
test: $(STAMP)
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

# Unit tests only (no Ray, no servers): seconds, for the edit-test loop.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not ray and not slow and not cluster" $(PYTEST_ARGS)

# Vanilla vs LDS+FDS on synthetic data, 2 Ray Train workers, local Ray, SQLite MLflow.
demo: $(STAMP)
	$(PY) -m raydir.demo

# Quality regression check: the synthetic suite (carved interpolation / extrapolation ranges),
# 3 seeds x vanilla / lds / fds / lds_fds, under 10 minutes on 2 cores. Table in bench_results/quick.
BENCH_METHODS ?= vanilla lds fds lds_fds
bench-quick: $(STAMP)
	$(PY) -m raydir.cli bench --suite synthetic --seeds 3 --methods $(BENCH_METHODS) \
		--config jobs/configs/bench/quick.yaml --out bench_results/quick

clean:
	rm -rf $(VENV) .pytest_cache .raydir_cache
