# Every target creates the virtual environment first when it is missing, so `make test` works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users install the CUDA build themselves (see README).
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint docs demo demo-assets bench clean

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

# The README's recipe key reference, regenerated from the schema in qalign/recipe.py.
docs: install
	$(BIN)/python -m qalign.recipe_docs --write-readme

# The offline quickstart: SFT, DPO and merge on the bundled model, then the before/after table and the curves
# (qalign report says where it wrote them: runs/demo/report.png).
demo: install
	$(BIN)/qalign run recipes/demo.yaml
	$(BIN)/python scripts/demo_report.py recipes/demo.yaml
	$(BIN)/qalign report recipes/demo.yaml

# Regenerate the demo's data and pretrain its base model (deterministic; minutes on a CPU).
demo-assets: install
	$(BIN)/python scripts/demo_task.py
	$(BIN)/python scripts/build_demo_model.py

# qalign against TRL on the same machine; writes benchmarks/RESULTS.md. On a 2-core Intel Xeon, 30 minutes without
# the lever runs (BENCH_ARGS=--no-levers: 20 measurements a repetition, 3 repetitions); the levers add 11 more.
# The bench extra installs without touching torch: the installed version is pinned for pip's resolver.
bench: install
	$(BIN)/pip install --quiet -e ".[bench]" "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')"
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
