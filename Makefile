# The two commands of the README. Both set up .venv on first use:
#   make all    # the whole default study -> results/table.csv, results/report.md
#   make test   # the test suite
# torch goes in first: 2.13.0 is the CPU build on this project's machines. On a GPU machine,
# set TORCH_SPEC to the CUDA build you want (e.g. TORCH_SPEC="torch==2.13.0").
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORES ?= all
BIN := $(VENV)/bin

.PHONY: all test setup
all: setup
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores $(CORES) results/table.csv

test: setup
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -n 2 -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@
