# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo demo-rl install clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch==2.13.0 first: on the project's CPU machines it is the local CPU wheel (no CUDA download).
$(STAMP): $(VPY) pyproject.toml
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	# the released DiffusionGemma chat template (a test oracle) ships in TRL's wheel; its pins clash with ours
	$(VPY) -m pip install -q --no-deps trl==1.16.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests

# the tests without the slow and torchrun tiers: the loop to run while editing (under a minute on 2 cores)
test-fast: $(STAMP)
	$(VPY) -m pytest tests -m "not slow and not dist"

demo: $(STAMP)
	$(VENV)/bin/blockdiff demo --out runs/demo

demo-rl: $(STAMP)
	$(VENV)/bin/blockdiff demo --rl --out runs/demo

clean:
	rm -rf $(VENV) runs
