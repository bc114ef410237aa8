# Two commands on a fresh machine (see README.md):
#   make demo   installs what the demo needs into .venv (offline data included), runs it
#   make test   installs everything into .venv, runs ruff, mypy and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

.PHONY: install install-demo install-docs data demo docs test test-backends lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch pinned to the CPU wheel (a plain `torch` pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

install: $(BIN)/python data
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test,plots,data,edge,backends]"
	# The peer the detector tests compare with; --no-deps: its detectors and metrics
	# need no torchvision (tests install a stand-in module), which would pull a CUDA torch.
	$(BIN)/python -m pip install --no-deps "pytorch-ood==0.4.0"

# Fashion-MNIST as Debian ships it (the raw idx files; offline afterwards).
data:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	fi

# The demo's needs only: the core (Keras, TensorFlow) and the [demo] extra
# (scikit-learn, scikit-image, matplotlib); no PyTorch, JAX or edge runtimes.
install-demo: $(BIN)/python data
	$(BIN)/python -m pip install -e ".[demo]"

demo: install-demo
	$(BIN)/keras-isomax demo $(DEMO_ARGS)

# The documentation site (mkdocs.yml): docs/ and the API reference from the docstrings,
# built into site/ with --strict (any warning fails; tests/test_docs.py builds it too).
install-docs: $(BIN)/python
	$(BIN)/python -m pip install -e ".[docs]"

docs: install-docs
	$(BIN)/mkdocs build --strict

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Annotations checked (pyproject.toml [tool.mypy]: every function annotated).
typecheck: install
	$(BIN)/mypy

# The whole suite on TensorFlow, then its backend-neutral part (every file not in
# tests/conftest.py's TENSORFLOW_ONLY_FILES) on JAX and PyTorch.
test: lint typecheck
	$(BIN)/python -m pytest
	$(MAKE) test-backends

test-backends:
	KERAS_BACKEND=jax $(BIN)/python -m pytest -m backend_neutral
	KERAS_BACKEND=torch $(BIN)/python -m pytest -m backend_neutral

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
