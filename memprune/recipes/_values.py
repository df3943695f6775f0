"""Recipe values from what users type (``KEY=VALUE``, ``--augment PRESET KEY=VALUE``,
``SPLIT[:FILE[:PART]]``), and partial recipes built key by key: what the CLI verbs and
``--set`` share."""

from __future__ import annotations

import copy

from memprune.errors import ConfigError


def put_key(tree: dict, key: str, value) -> None:
    """Set the dotted ``key`` (``actions.prune.ratios``) of a nested mapping."""
    *parents, last = key.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a mapping")
        tree = child
    tree[last] = value


def merge(base: dict, more: dict) -> dict:
    """A new mapping: ``base`` with ``more`` laid over it, mapping by mapping (neither is
    changed, nor shared with the result)."""
    out = copy.deepcopy(base)
    for k, v in more.items():
        keep = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge(out[k], v) if keep else copy.deepcopy(v)
    return out


def parse_key_values(pairs: list[str] | None, flag: str) -> dict:
    """``KEY=VALUE`` strings (values read as YAML) as a mapping."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE (e.g. scale=[0.3,1.0]), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def parse_augment(tokens: list[str], flag: str = "--augment"):
    """``PRESET KEY=VALUE ...`` as a recipe's augmentation: a preset name, or a mapping of its
    parameters (with ``preset``)."""
    presets = [t for t in tokens if "=" not in t]
    if len(presets) > 1:
        raise ConfigError(f"{flag} takes one preset name, got {presets}")
    params = parse_key_values([t for t in tokens if "=" in t], flag)
    if not params:
        return presets[0] if presets else None
    return {**({"preset": presets[0]} if presets else {}), **params}


def parse_count(text: str) -> int | float:
    """``"0.5"`` is a fraction, ``"100"`` a count."""
    return float(text) if "." in text else int(text)


def parse_points(spec: str, flag: str) -> dict:
    """``SPLIT[:FILE[:PART]]`` as ``data.members`` / ``data.nonmembers``: a split, restricted
    to the indices of FILE (a JSON list, or a memprune splits.json and which PART of it)."""
    from memprune.data import read_indices

    split, _, rest = spec.partition(":")
    path, _, part = rest.rpartition(":") if rest.count(":") else (rest, "", "")
    if split not in ("train", "test"):
        raise ConfigError(f"{flag} {spec!r}: write SPLIT[:FILE[:PART]] with SPLIT train or test")
    if path:
        try:
            read_indices(path, part or None)
        except ConfigError as err:
            raise ConfigError(f"{flag} {spec!r}: {err}") from None
    return {"split": split, "indices": path or None, "part": part or None}


#: Every stage switched off: a recipe that runs only the stages laid over it.
STAGES_OFF = {
    "encoder": {"pretrain": None, "supervised": {"enabled": False}},
    "scores": {s: {"enabled": False}
               for s in ("unitmem", "classmem", "sslmem", "layermem", "membergap", "cka")},
    "actions": {"prune": {"enabled": False}, "finetune": {"enabled": False}},
    "evaluation": {"linear": False, "knn": False},
}  # fmt: skip
