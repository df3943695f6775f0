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

# The most complete job so far, on digits: SimCLR-train the pair f (shared+candidates) and g
# (shared+extras), LayerMem/ΔLayerMem of the candidates, UnitMem of every unit of f, then
# pruning f by UnitMem against random and magnitude, each pruned encoder linear-probed.
# A finished pair is reused (--resume); the score directories are rewritten (--force).
DEMO := runs/demo
TINY := --timm "channels=[8,16,32,64]"
AUG  := --aug "scale=[0.3,1.0]"
demo: $(STAMP)
	$(VENV)/bin/memprune pretrain --pair --data digits --epochs 30 --lr 3e-3 --proj-dim 64 $(AUG) $(TINY) --out $(DEMO)/pair --resume
	$(VENV)/bin/memprune score layers --f $(DEMO)/pair/f --g $(DEMO)/pair/g --data digits $(AUG) --out $(DEMO)/layers --force
	$(VENV)/bin/memprune score units --checkpoint $(DEMO)/pair/f --data digits --views 10 --out $(DEMO)/units --force
	$(VENV)/bin/memprune prune --checkpoint $(DEMO)/pair/f --scores $(DEMO)/units --data digits --ratio 0.2 0.5 --out $(DEMO)/prune --force
	@echo "demo results: $(DEMO)/pair (encoders), $(DEMO)/layers (LayerMem), $(DEMO)/units (UnitMem), $(DEMO)/prune (pruning)"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/unitmem_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
