# blobflow developer targets. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help setup system-deps demo test test-fast lint bench bench-quick bench-mirror bench-registry clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) system-deps ## venv with blobflow (editable) and test tools; docker-registry and skopeo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,dev]'
	@# byte-compile once: with PYTHONDONTWRITEBYTECODE set, every start would compile again
	$(VENV)/bin/python -m compileall -q -j 0 blobflow $(VENV)/lib >/dev/null || true
	touch $(STAMP)

system-deps: ## install docker-registry and skopeo (Debian packages) when missing
	@missing=""; \
	command -v docker-registry >/dev/null 2>&1 || missing="$$missing docker-registry"; \
	command -v skopeo >/dev/null 2>&1 || missing="$$missing skopeo"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "blobflow needs the Debian packages:$$missing"; \
	    echo "install them with: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

demo: setup ## push, copy and pull a generated image on a throwaway local registry
	$(PY) -m blobflow.demo

test: setup ## the whole test suite against real registries
	$(VENV)/bin/pytest -q

lint: setup ## ruff and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup ## blobflow vs skopeo: pull, push, copy of a 1 GiB image
	$(PY) benches/bench_engine.py

bench-quick: setup ## the same bench, small image, one repeat
	$(PY) benches/bench_engine.py --quick

bench-mirror: setup ## blobflow mirror vs skopeo sync: 48 small images sharing layers + 2 large
	$(PY) benches/bench_mirror.py

bench-registry: setup ## blobflow bench sweep on a local registry -> docs/bench-registry.{json,png}
	$(VENV)/bin/pip install --quiet -e '.[plot]'
	$(PY) benches/bench_registry.py

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .bench
