# Two entry points: `make demo` (the main job) and `make test` (everything CI checks).
# Both create .venv and install into it first, so they work on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when the venv has none. Pick another build with e.g.
# `make test TORCH=torch` (newest) or TORCH="torch --index-url <your wheel index>".
TORCH ?= torch==2.13.0
# The versions CI tested. To test against the newest releases instead, in a venv of its own:
# `make test VENV=.venv-newest CONSTRAINTS=`.
CONSTRAINTS ?= constraints.txt
# What the notebooks' Colab install cells pin (constraints-colab.txt), out of constraints.txt.
COLAB_PINNED := transformers|tokenizers|huggingface[-_]hub|safetensors|peft|rapidfuzz|jupyter[-_]bbox[-_]widget|anywidget|ray|fastapi|starlette|uvicorn|python[-_]multipart|mcp|mcp[-_]types
TINY_MODEL := .cache/tiny-florence2
SAMPLE ?= images/astronaut.jpg
TASK ?= OD
INSTALLED := $(VENV)/.installed

.PHONY: install demo demo-offline test test-browser lint format notebooks constraints clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Installs only when the venv is new or pyproject.toml / the constraints changed.
install: $(INSTALLED)

$(INSTALLED): pyproject.toml $(CONSTRAINTS) | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@touch $@

# Run a task on a sample image and write an annotated picture (needs the model: hub or
# FLORENCE_MODEL). Without hub access it says so and points to `make demo-offline`.
demo: install
	@$(PY) -m florence_helpers $(SAMPLE) --task $(TASK) --out demo.png; \
	status=$$?; \
	if [ $$status -eq 3 ]; then \
		echo ""; \
		echo "No model could be loaded. To see the pipeline work offline with a tiny"; \
		echo "random-weight model (its answers are noise), run: make demo-offline"; \
	fi; \
	exit $$status

demo-offline: install
	$(PY) -m florence_helpers.testing $(TINY_MODEL)
	FLORENCE_MODEL=$(TINY_MODEL) $(PY) -m florence_helpers $(SAMPLE) --task $(TASK) \
		--out demo.png --max-new-tokens 64

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) tools/notebooks.py check

# Unit tests, doctests, and every notebook executed offline with the tiny model (nbval), in
# parallel on up to 4 cores (pytest-xdist; how tests are grouped: conftest.py). The 30 slowest
# tests are listed at the end. `make test PYTEST_WORKERS=0` runs them in this one process.
# OpenMP threads that wait passively: the fine-tuning tests that train with 2 threads, beside
# another worker, spent their time spinning (one took 26.8 s against 11.5 s passive beside a
# busy core, and up to 190 s in a whole run; measured on the 2-core Intel Xeon, 2026-12-03).
PYTEST_WORKERS ?= auto
OMP_WAIT_POLICY ?= PASSIVE
test: lint
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PY) -m pytest tests florence_helpers notebooks \
		--doctest-modules --ignore=florence_helpers/__main__.py \
		--nbval-lax --nbval-current-env \
		-n $(PYTEST_WORKERS) --maxprocesses=4 --dist loadfile --no-loadscope-reorder \
		--durations=30

# Only the explorer's browser test: JupyterLab in headless Chromium (Debian's `chromium`
# package; skipped without it). Screenshots go to .cache/browser-screenshots.
test-browser: install
	$(PY) -m pytest tests/test_explorer_browser.py -rs

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Re-run the notebooks and store only the outputs nbval checks (see tools/notebooks.py).
notebooks: install
	$(PY) tools/notebooks.py sync
	$(PY) tools/notebooks.py outputs

# After a green `make test` in a venv without constraints: record its versions as the tested ones.
constraints: install
	@{ echo "# The exact versions CI last tested (torch is installed separately: see TORCH in the Makefile)."; \
	   echo "# make install uses them; regenerate after a green run against newer releases: make constraints"; \
	   $(PY) -m pip freeze --exclude-editable | grep -v -i -E "^(torch|florence-helpers)[=@ ]"; } > constraints.txt
	@{ echo "# Tested versions the Colab install cells hold to (-c): the libraries whose behaviour the helpers"; \
	   echo "# depend on. Colab's own torch, numpy, pillow and matplotlib stay as they are. Written by make constraints."; \
	   grep -i -E "^($(COLAB_PINNED))==" constraints.txt; } > constraints-colab.txt

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache demo.png
