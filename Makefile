# Two commands do everything on a fresh machine with Python >= 3.11, pip and make:
#   make repro   install into .venv, restore data/ (data.dvc), run the pipeline (dvc repro)
#   make test    install into .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test repro data lab

$(INSTALLED): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: $(PYTHON) is older than Python 3.11; run make PYTHON=python3.11 ..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(INSTALLED)

test: install
	$(BIN)/python -m pytest -q

repro: install
	$(BIN)/dvc pull --quiet data.dvc
	$(BIN)/dvc repro

# Regenerate the synthetic world from params.yaml's `world` section and version it.
data: install
	$(BIN)/python -m vlm_rlaif.synthetic --params params.yaml --out data
	$(BIN)/dvc add data
	$(BIN)/dvc push data.dvc

lab: install
	$(BIN)/jupyter lab
