# Two commands do all the set-up:  `make demo`  and  `make test`.
# Each creates/refreshes .venv (CPU torch pinned first, so no CUDA build is pulled) and installs
# the system packages it needs (ffmpeg for torchcodec, espeak-ng for the generated corpus).
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_SLOTS ?= 2
TEST_WORKERS ?= auto

.PHONY: setup system-packages demo test clean

setup: system-packages $(VENV)/.installed

system-packages:
	@if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null; then \
	  echo "installing ffmpeg and espeak-ng (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "error: ffmpeg and espeak-ng are missing and this user cannot apt-get install them" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends ffmpeg espeak-ng >/dev/null; \
	fi

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

demo: setup
	$(PY) run_grid.py --config configs/demo.yaml --slots $(DEMO_SLOTS)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf demo_output .pytest_cache
