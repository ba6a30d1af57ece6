# Two commands for a newcomer: `make demo` and `make test` (and `make bench` for the measurements).
# Each creates or refreshes .venv and installs what it needs (the Fashion-MNIST Debian package included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := runs/demo

.PHONY: demo test test-arm arm-tools bench dataset venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned to the CPU build first; the extras then find it already satisfied.
# The convert extra pins onnx2tf's exact toolchain (tensorflow 2.19, numpy 1.26): ~3.4 GB in all.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[builder,convert,dev]"
	touch $@

venv: $(VENV)/.installed

# The tests also cover the Ray backend (`--backend ray`), so they need the `ray` extra; `make demo` does not.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[builder,convert,dev,ray]"
	touch $@

# The benchmarks add matplotlib for their plots; `make demo` and `make test` do not need it.
$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[builder,convert,dev,bench]"
	touch $@

# The query service (`poe-service serve`: FastAPI, uvicorn) and manifest signing (cryptography); its tests run in `make test`.
$(VENV)/.installed-serve: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[builder,convert,dev,serve]"
	touch $@

dataset:
	@if [ ! -f $(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: venv dataset
	$(BIN)/pool-builder build --profile quick --out $(DEMO)/pool
	$(BIN)/pool-builder query --pool $(DEMO)/pool --tasks footwear,tops --tasks bottoms,bags --tasks tops,bottoms,footwear
	$(BIN)/poe-convert export --pool $(DEMO)/pool --out $(DEMO)/fragments --overwrite \
	  --query footwear,tops --query bottoms,bags --query tops,bottoms,footwear --summary $(DEMO)/convert_summary.json
	$(BIN)/poe-convert fuse --fragments $(DEMO)/fragments --tasks footwear,tops --out $(DEMO)/footwear_tops.onnx

# Quick version of every benchmark (reuses runs/demo/pool when `make demo` built it), then runs/bench/REPORT.md.
bench: venv $(VENV)/.installed-bench dataset
	$(BIN)/python benchmarks/run_all.py --quick --out runs/bench

test: venv $(VENV)/.installed-ray $(VENV)/.installed-serve dataset
	$(BIN)/python -m pytest -q tests

# The edge runtime on emulated Raspberry Pi 4 / 5 CPUs (aarch64, qemu user mode) against x86: see docs/devices.md
# (section "Raspberry Pi").  The arm64 sysroot and wheels are cached in .cache/arm64; no chroot, no binfmt.
arm-tools:
	@if ! command -v qemu-aarch64-static >/dev/null || ! command -v mmdebstrap >/dev/null; then \
	  echo "installing Debian packages qemu-user-static mmdebstrap"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends qemu-user-static mmdebstrap; \
	fi

test-arm: venv dataset arm-tools
	$(BIN)/python -m tools.arm64

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
