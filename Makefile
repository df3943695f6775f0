# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs memprune into it on first use (pinned by constraints.txt).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: demo test install lint bench clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/unitmem_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
