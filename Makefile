# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs memprune into it on first use (pinned by constraints.txt).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: demo test test-fast install lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -c "import memprune, torch, torchvision, timm, torch_pruning"
	touch $(STAMP)

install: $(STAMP)

# The whole loop on digits, from recipes/digits-resnet.yaml: SimCLR pair f / g, a supervised
# baseline, UnitMem / ClassMem / SSLMem / LayerMem, probes, pruning by UnitMem against random and
# magnitude, fine-tuning by ΔLayerMem against last-k / random-k / all, then report.md.
# A finished run is reused (--resume skips finished stages); --force starts over.
DEMO := runs/digits-resnet
demo: $(STAMP)
	$(VENV)/bin/memprune run recipes/digits-resnet.yaml --out $(DEMO) --resume

# Two pytest workers, a test file each at a time (module fixtures are built once), one torch
# thread each: both cores busy (README, "Tests").
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# The edit loop: the unit tests of the library core, under a minute on 2 cores (the CLI,
# recipe, multi-process and end-to-end tests are left to `make test`).
FAST := tests/test_hooks.py tests/test_registry.py tests/test_sites.py tests/test_unitmem.py \
	tests/test_sslmem.py tests/test_findings.py tests/test_stages.py tests/test_layering.py \
	tests/test_prune.py tests/test_data.py
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 $(FAST)

# ruff: lint (with a complexity cap, C90 max-complexity 15) and format; CI runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/unitmem_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
