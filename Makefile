# `make demo` and `make test` are the two commands; each does its own set-up in .venv (Linux).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The verified torch, installed before the project so that its `torch>=2.4` range is already met:
# on these machines pip takes the local CPU wheel. Elsewhere give pip PyTorch's CPU-only index through
# PIP_TORCH_OPTIONS, or on a GPU machine TORCH= VENV_OPTIONS=--system-site-packages to keep the CUDA
# build installed in the system's Python (the venv then sees it; without the option it holds no torch;
# options apply when the venv is made: `make clean` first).
TORCH ?= torch==2.13.0
PIP_TORCH_OPTIONS ?=
VENV_OPTIONS ?=

.PHONY: setup perf-analyzer chromium promtool test test-fast lint fuzz bench soak gpu-rehearsal demo serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_OPTIONS) $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(if $(TORCH),$(PY) -m pip install --quiet $(PIP_TORCH_OPTIONS) "$(TORCH)")
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP)

# Triton's perf_analyzer, for the benchmarks and their tests (not the demo): a binary taken from the
# tritonclient 2.51 wheel, libcudart from PyPI, Debian's libb64-0d (apt-get: run as root).
PERF_ANALYZER := $(VENV)/perf_analyzer/bin/perf_analyzer
$(PERF_ANALYZER): | $(STAMP)
	$(PY) -m benchmarks.perf_analyzer install

perf-analyzer: $(PERF_ANALYZER)

# Headless Chromium, which the tests drive to sort the explained report's HTML page: Debian's chromium,
# installed with apt-get when it is missing (run as root).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

chromium: $(CHROMIUM)

# Prometheus's promtool 2.42, which the tests run on the alert rules (deploy/prometheus-rules.test.yml):
# the one binary, taken from Debian's prometheus package without installing it (no service started;
# apt-get update, run as root, only when the package lists no longer have it).
PROMTOOL := $(VENV)/bin/promtool
$(PROMTOOL): | $(STAMP)
	rm -rf $(VENV)/prometheus-deb && mkdir $(VENV)/prometheus-deb
	cd $(VENV)/prometheus-deb && { apt-get download prometheus || { apt-get update && apt-get download prometheus; }; }
	dpkg-deb -x $(VENV)/prometheus-deb/prometheus_*.deb $(VENV)/prometheus-deb/root
	cp $(VENV)/prometheus-deb/root/usr/bin/promtool $(PROMTOOL)
	rm -rf $(VENV)/prometheus-deb

promtool: $(PROMTOOL)

# Everything: the tests against the real bundled tritonserver and the library tests, in TEST_WORKERS
# processes (pytest-xdist), each file in one of them (its servers and fixtures are shared by its tests),
# handed out in collection order (pyproject's testpaths: the long server files first) rather than
# xdist's default of the files with most tests first. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: setup $(PERF_ANALYZER) $(CHROMIUM) $(PROMTOOL)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Library tests only (no server), in one process: about 2.5 minutes on 2 cores.
test-fast: setup $(CHROMIUM) $(PROMTOOL)
	$(PY) -m pytest -q tests/library

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck $$(git ls-files '*.sh')

# Fuzz the DICOM reading path for FUZZ_SECONDS (atheris, one worker): bytes of a file, a ZIP, several
# files or a folder -> preprocess_study at S=16, from a seed corpus generated into build/fuzz/corpus.
# A crash (anything but a StudyError), a hang or memory past the limit stops it with a non-zero exit
# status and writes the input to build/fuzz/artifacts. Longer runs, cheaper depths: python -m fuzz --help.
# atheris 3.0.0 has wheels for CPython 3.11 and 3.12 on Linux x86-64 only: with Python 3.10 (or on
# another CPU) pip builds it from source, which needs Clang with libFuzzer (atheris's CLANG_BIN).
FUZZ_SECONDS ?= 60
fuzz: setup
	$(PY) -m pip install --quiet -e ".[fuzz]"
	$(PY) -m fuzz --seconds $(FUZZ_SECONDS)

# The serving benchmarks on this machine at a small S (7 min on 2 Zen 4 cores): benchmarks/results/.
bench: setup $(PERF_ANALYZER)
	$(PY) -m benchmarks.serving --size 64 --out benchmarks/results

# The soak (not part of `make test`): 10 min of valid and invalid studies at concurrency 4 against the
# supervised CPU server; memory must stay flat; benchmarks/results/soak-cpu.*.
soak: setup
	nice -n 5 $(PY) -m benchmarks.soak --minutes 10 --out benchmarks/results

# Before a GPU session: benchmarks/gpu_check.sh --smoke under the lent GPU machine's software (Python 3.12,
# torch 2.11, numpy 2, only the carried packages), on this CPU (first run: about 5 GB into build/).
gpu-rehearsal: setup
	bash benchmarks/gpu_rehearsal.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The demo: export with demo weights at S=256, start the bundled Triton, classify a phantom, stop.
demo: setup
	$(PY) -m demo

# Serve a repository in the foreground (Ctrl-C stops it cleanly): the committed one once exported
# (before that, `python -m serve` says so in one line).
REPOSITORY ?= model_repository
serve: setup
	$(PY) -m serve --repository $(REPOSITORY)
