# Two commands do all the set-up:  `make demo`  and  `make test`.
# Each creates/refreshes .venv (CPU torch pinned first, so no CUDA build is pulled) and installs
# the system packages it needs (ffmpeg for torchcodec, espeak-ng for the generated corpus).
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_SLOTS ?= 2
TEST_WORKERS ?= auto

.PHONY: setup system-packages slurm-packages demo test clean

setup: system-packages $(VENV)/.installed

system-packages:
	@if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null; then \
	  echo "installing ffmpeg and espeak-ng (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "error: ffmpeg and espeak-ng are missing and this user cannot apt-get install them" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends ffmpeg espeak-ng >/dev/null; \
	fi

# The Slurm tests start a single-node Slurm (tests/slurm_cluster.py); its daemons need root, so
# the packages are installed only for root (elsewhere those tests are skipped, and say why).
slurm-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; }; then \
	  echo "installing slurmctld, slurmd, slurm-client and munge (apt) for the Slurm tests"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null)); \
	fi

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	@touch $@

demo: setup
	$(PY) run_grid.py --config configs/demo.yaml --slots $(DEMO_SLOTS)

test: setup $(VENV)/.installed-test slurm-packages
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile tests  # -rs: the reason of every skip

clean:
	rm -rf demo_output .pytest_cache
