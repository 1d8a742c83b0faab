# Every target creates the virtual environment first when it is missing, so `make test` works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users install the CUDA build themselves (see README).
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint clean

$(BIN)/qalign: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Keep a torch that is already there (e.g. a CUDA build a GPU user installed); else take the CPU pin.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

install: $(BIN)/qalign

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check qalign tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
