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
