# Two commands on a fresh machine (see README.md):
#   make demo   installs everything into .venv (offline data included), runs the main job
#   make test   installs everything into .venv, runs ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

.PHONY: install data demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python data
	$(BIN)/python -m pip install -e ".[test,plots,data]"

# Fashion-MNIST as Debian ships it (the raw idx files; offline afterwards).
data:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	fi

demo: install
	$(BIN)/keras-isomax demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
