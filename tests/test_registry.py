"""One registry per option concept: the errors, the CLI choices and the recipe schema agree."""

import typing

import pytest

from memprune.cli import build_parser
from memprune.errors import ConfigError
from memprune.pruning import PRUNING_STRATEGIES as STRATEGIES
from memprune.recipes._schema import PruneCfg
from memprune.registry import Registry
from memprune.stats import RESTS


def test_unknown_name_lists_the_valid_ones():
    reg = Registry("colour", {"red": 1, "blue": 2})
    assert reg["red"] == 1 and reg.check("blue") == "blue" and reg.names == ("red", "blue")
    with pytest.raises(ConfigError, match="unknown colour 'green': use one of red, blue"):
        reg["green"]


def _choices(argv: list[str], dest: str):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    for name in argv[1:]:
        sub = sub._subparsers._group_actions[0].choices[name]
    return next(a.choices for a in sub._actions if dest in a.option_strings)


def test_cli_and_recipe_choices_come_from_the_registries():
    assert tuple(_choices(["prune"], "--strategy")) == tuple(STRATEGIES)
    assert tuple(_choices(["score", "units"], "--rest")) == tuple(RESTS)
    hints = typing.get_type_hints(PruneCfg)
    (literal,) = typing.get_args(hints["strategies"])
    assert typing.get_args(literal) == tuple(STRATEGIES)


def test_the_root_exports_one_list_and_loads_subpackages_lazily():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import memprune

    source = Path(memprune.__file__).read_text()
    checked = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.If)
                   and getattr(n.test, "id", "") == "TYPE_CHECKING")  # fmt: skip
    typed = {a.asname or a.name for node in ast.walk(checked) if isinstance(node, ast.ImportFrom)
             for a in node.names}  # fmt: skip
    assert typed == set(memprune._EXPORTS) == set(memprune.__all__)
    for name in memprune.__all__:
        assert getattr(memprune, name) is not None, name
    # a plain `import memprune` loads no subpackage until one is used, then it works
    code = ("import sys, memprune; assert 'memprune.data' not in sys.modules;"
            " assert memprune.data.MultiView.__name__ == 'MultiView';"
            " assert memprune.pruning.UnitMemImportance and 'torch' in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
