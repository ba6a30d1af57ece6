# Two commands for a newcomer: `make demo` and `make test`.  Both create or refresh
# .venv and install what they need (the Fashion-MNIST Debian package included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := runs/demo

.PHONY: demo test dataset venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned to the CPU build first; the extras then find it already satisfied.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[builder,dev]"
	touch $@

venv: $(VENV)/.installed

# The tests also cover the Ray backend (`--backend ray`), so they need the `ray` extra; `make demo` does not.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[builder,dev,ray]"
	touch $@

dataset:
	@if [ ! -f $(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: venv dataset
	$(BIN)/pool-builder build --profile quick --out $(DEMO)/pool
	$(BIN)/pool-builder query --pool $(DEMO)/pool --tasks footwear,tops --tasks bottoms,bags --tasks tops,bottoms,footwear

test: venv $(VENV)/.installed-ray dataset
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
