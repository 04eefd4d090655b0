# One-command set-up: every target builds .venv from the pinned files first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt -c constraints.txt
	touch $@

# oneDNN convolutions and batch norm for XLA:CPU (arch/kernels): headers and libdnnl from the
# pinned onednn wheels in the venv, XLA's FFI headers from jaxlib; found at run
# time through the venv-relative rpath. Without it, arch falls back to pure XLA.
KERNEL := arch/kernels/_onednn.so
KERNEL_SOURCES := arch/kernels/onednn_conv.cc arch/kernels/onednn_norm.cc
CXX ?= g++

$(KERNEL): $(KERNEL_SOURCES) arch/kernels/onednn_common.h $(BIN)/.installed
	$(CXX) -O2 -std=c++17 -shared -fPIC -o $@ $(KERNEL_SOURCES) -I. -I$(VENV)/include \
	  -isystem "$$($(BIN)/python -c 'import jax; print(jax.ffi.include_dir())')" \
	  -L$(VENV)/lib -ldnnl -Wl,-rpath,'$$ORIGIN/../../$(VENV)/lib'

.PHONY: venv kernels test demo
venv: $(BIN)/.installed
kernels: $(KERNEL)

test: venv kernels
	$(BIN)/python -m pytest -q tests

demo: venv kernels
	$(BIN)/python launch.py sweep --config experiments/degradation.py --workdir runs/degradation
	$(BIN)/python launch.py report --workdir runs/degradation
