# The two commands of the README: `make demo` (set up and train the demo) and `make test`.
# Both create the virtual environment and fetch the demo data on first use.
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision must be a matching pair; on a GPU machine pick the build for your CUDA, e.g.
# make demo TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint demo-data

demo: $(VENV)/.installed demo-data
	$(VENV)/bin/trivit train --config configs/demo.yaml $(ARGS)

test: $(VENV)/.installed demo-data lint
	$(VENV)/bin/python -m pytest -q --durations=20 $(PYTEST_ARGS)

# While working: every test that neither trains nor starts a process (tests/conftest.py marks the others slow).
test-fast: $(VENV)/.installed demo-data lint
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# ruff.toml's rules; `make test` (hence .ci/run) runs it first.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q $(TORCH) -e '.[test]'
	touch $@

# Fashion-MNIST ships as a Debian package; if it cannot be installed here, trivit's error says how.
demo-data:
	@test -d $(FASHION_MNIST) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; } \
		|| echo "could not install dataset-fashion-mnist; install it with: sudo apt-get install -y dataset-fashion-mnist"
