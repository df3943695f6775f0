"""The README's Python examples run as written, in order, at a small budget.

Every ``python`` block of README.md is executed in one namespace (a later block uses what an
earlier one made, as a reader would). Only budgets are lowered, by exact text substitutions that
must each match, so an edited example cannot silently escape the test; the few names an example
takes from the reader's own code (a batch, a loader) are defined before the block that uses them.
"""

from __future__ import annotations

import re

import pytest

from .conftest import ROOT, TINY_RESNET

#: Budget substitutions: text in the README -> text run here, with how often it must occur.
SMALLER = {
    'shift_train = memprune.load_dataset("digits-shift", "train")': (
        'shift_train = seeded_subset(memprune.load_dataset("digits-shift", "train"), 200, 0)',
        1,
    ),
    'data = memprune.load_dataset("digits", "train")': (
        'data = seeded_subset(memprune.load_dataset("digits", "train"), 300, 0)',
        1,
    ),
    # a ResNet-18 0.2M weights wide instead of 11M
    'load_encoder("resnet18", img_size=32)': (
        'load_encoder("resnet18", img_size=32, channels=TINY)',
        1,
    ),
    "proj_dim=64,": ("proj_dim=64, channels=TINY,", 1),
    "n_views=10": ("n_views=2", 4),
    "epochs=30": ("epochs=1", 1),
    "epochs=20": ("epochs=1", 3),
    "seeds=[0, 1, 2]": ("seeds=[0]", 1),
    "n_pairs=10": ("n_pairs=2", 2),
    'keep_checkpoints=True, out_dir="runs/s"': (
        'keep_checkpoints=True, out_dir="runs/s", epochs=2, channels=TINY',
        1,
    ),
    "probe_size=256": ("probe_size=32", 1),
    "group_size=64": ("group_size=16", 1),
    "minibatch=256": ("minibatch=64", 1),
}

#: The names the substitutions use.
PRELUDE = f"""
import torch
from memprune.data import seeded_subset
TINY = {TINY_RESNET["channels"]}
"""

#: What the reader brings: code run before the first block that contains the key.
BRINGS = {
    "model(x)": "x = torch.rand(4, 3, 32, 32)",
    "in loader:": "loader = torch.utils.data.DataLoader(data, batch_size=256)",
    "candidates)": "candidates = splits.candidate",
    "memprune.cka(test, f, supervised": (
        "test = memprune.load_dataset('digits', 'test')\n"
        "supervised = g\n"
        "X, Y = torch.randn(200, 16), torch.randn(200, 8)"
    ),
}


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_examples():
    blocks = readme_blocks()
    assert len(blocks) >= 8, "README python blocks not found: did the fences change?"
    source = "\n".join(blocks)
    for old, (_, count) in SMALLER.items():
        assert source.count(old) == count, f"README budget {old!r}: update SMALLER"
    for key in BRINGS:
        assert key in source, f"README no longer uses {key!r}: update BRINGS"


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    import torch

    import memprune

    monkeypatch.chdir(tmp_path)  # the examples write out/ and runs/ relative to here
    namespace: dict = {"__name__": "readme"}
    exec(PRELUDE, namespace)
    brought = set()
    for i, block in enumerate(readme_blocks()):
        for old, (new, _) in SMALLER.items():
            block = block.replace(old, new)
        for key, code in BRINGS.items():
            if key in block and key not in brought:
                brought.add(key)
                exec(code, namespace)
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block, keep the traceback
            raise AssertionError(f"README python block {i + 1} failed:\n{block}") from e

    # the examples produced what they say they do
    assert isinstance(namespace["result"], memprune.UnitMemResult)
    assert isinstance(namespace["metric"].compute(), memprune.UnitMemResult)
    assert isinstance(namespace["classes"], memprune.ClassMemResult)
    assert isinstance(namespace["report"], memprune.PruneResult)
    assert (tmp_path / "out" / "unitmem.safetensors").exists()
    assert (tmp_path / "runs" / "small").exists()
    small = namespace["small"]
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in namespace["f"].parameters()
    )
    knn = namespace["k"]  # its accuracy is what its confusion matrix of the test split counts
    assert knn.accuracy == float(knn.confusion.trace()) / float(knn.confusion.sum())
    assert torch.is_tensor(namespace["feats"].features)
    strategies = [r["strategy"] for r in namespace["rows"]]
    assert strategies == ["linear probe", "top gap", "top unitmem", "top rgn", "last", "first",
                          "random", "all"]  # fmt: skip
