# Two commands matter: `make demo` and `make test`. Each does its own set-up in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo serve clean

# torch==2.13.0 is pinned: on these machines pip takes the local CPU wheel; a looser pin would
# pull a multi-GB CUDA build onto a CPU-only machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The demo: export with demo weights at S=256, start the bundled Triton, classify a phantom, stop.
demo: setup
	$(PY) -m serve.demo

# Serve a repository in the foreground (Ctrl-C stops it cleanly). `make demo` writes the default one.
REPOSITORY ?= out/demo/repository
serve: setup
	@test -f $(REPOSITORY)/ct_triage/config.pbtxt || { echo "no model repository in $(REPOSITORY): run 'make demo' or '$(PY) -m export ... --out $(REPOSITORY)'"; exit 2; }
	$(PY) -m serve --repository $(REPOSITORY)
