# The two commands: `make run` (install everything, run a pod) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CARAPACE := $(VENV)/bin/carapace
STAMP := $(VENV)/.installed
APT_STAMP := .apt-installed
IMAGE_DIR ?= /var/lib/carapace/guest

.PHONY: run test unit integration deps image lint protos bench bench-containerd bench-docker bench-network bench-storage bench-footprint bench-template clean

run: image
	@echo "host kernel:      $$(uname -r)"
	@$(CARAPACE) run -- sh -c 'echo "container kernel: $$(uname -r)  (inside the pod VM)"; echo "container cpus:   $$(nproc)"; echo "container memory: $$(grep MemTotal /proc/meminfo | tr -s " " | cut -d" " -f2-)"'

test: image
	$(PY) -m pytest tests -q -ra

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

integration: image
	$(PY) -m pytest tests/integration -q -ra

deps: $(APT_STAMP) $(STAMP)

$(APT_STAMP): scripts/install-deps.sh
	bash scripts/install-deps.sh
	@touch $@

$(STAMP): pyproject.toml $(APT_STAMP)
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# `carapace guest build` rebuilds only when its inputs changed.
image: deps
	@$(CARAPACE) guest build

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I src --python_out=src --pyi_out=src src/carapace/protocols/*.proto src/carapace/protocols/containerd/*.proto

bench: image
	$(PY) benchmarks/boot.py
	$(PY) benchmarks/containerd.py
	$(PY) benchmarks/network.py
	$(PY) benchmarks/storage.py
	$(PY) benchmarks/docker.py
	$(PY) benchmarks/footprint.py
	$(PY) benchmarks/template.py

bench-docker: image
	$(PY) benchmarks/docker.py

bench-containerd: image
	$(PY) benchmarks/containerd.py

bench-network: image
	$(PY) benchmarks/network.py

bench-storage: image
	$(PY) benchmarks/storage.py

bench-footprint: image
	$(PY) benchmarks/footprint.py

bench-template: image
	$(PY) benchmarks/template.py

clean:
	rm -rf $(VENV) $(APT_STAMP)
