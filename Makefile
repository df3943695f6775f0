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

# The most complete job so far: the encoder's sites, then UnitMem of every unit on digits.
demo: $(STAMP)
	$(VENV)/bin/memprune sites --model resnet18 --data digits --views 4
	$(VENV)/bin/memprune score units --model resnet18 --data digits --views 10 --out runs/demo-unitmem --force

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/unitmem_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
