"""Coverage over timm families (benchmarks/coverage.py runs the whole list): on a fast subset,
every operation either works or is refused with a MemPruneError saying why, never a crash."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "coverage_bench", ROOT / "benchmarks" / "coverage.py"
)
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

#: One fast member of each family, and what it must support (``refused``: a clear
#: MemPruneError is the expected answer today).
EXPECTED = {
    "resnet18": {},
    "mobilenetv3_small_050": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "vit_tiny_patch16_224": {},
    "mobilevit_xxs": {},
    "swin_tiny_patch4_window7_224": {},
    "mixnet_s": {},
    "dpn68": {"prune": "refused"},  # torch-pruning cannot trace its concatenations
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_every_operation_works_or_is_refused_clearly(name):
    size, kw = coverage.MODELS[name]
    row, _ = coverage.check(name, size, kw)
    for column in coverage.COLUMNS[:-1]:  # the last column is torch-pruning's own MetaPruner
        status, detail = row[column]
        want = EXPECTED[name].get(column)
        assert status != "CRASH", (column, detail)
        if want is not None:
            assert status == want, (column, status, detail)
        elif status != "-":
            assert status == "ok", (column, status, detail)
