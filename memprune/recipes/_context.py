"""What the stages of one run share: the recipe, where each stage writes, the data and the
encoders (each made once, lazily)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from memprune.errors import ConfigError
from memprune.recipes._schema import Recipe


class Context:
    """The recipe, the run directory, the stages' directories, data and encoders.

    ``dirs`` maps a stage to its directory (default ``RUN/<stage>``: a CLI verb writes its
    own stage straight into ``--out``). ``overwrite``: a stage may replace files it finds in
    its directory (a rerun of an interrupted CLI verb; a recipe run clears the directory).
    """

    def __init__(
        self,
        recipe: Recipe,
        run: Path,
        log: Callable[[str], None] = print,
        dirs: dict[str, Path] | None = None,
        overwrite: bool = False,
    ):
        self.recipe, self.run, self.log = recipe, Path(run), log
        self.dirs, self.overwrite = dict(dirs or {}), overwrite
        self._cache: dict = {}

    def dir(self, stage: str) -> Path:
        return self.dirs.get(stage, self.run / stage)

    # ------------------------------------------------------------ data

    def dataset(self, name: str, split: str):
        from memprune.data import BUILTIN, load_dataset, native_size

        key = (name, split)
        if key not in self._cache:
            d = self.recipe.data
            if str(name).lower() == "toy":  # made at its own size unless one is asked for
                size = d.img_size or self.recipe.encoder.img_size
            else:
                size = native_size(name, self.input_size())
            builtin = str(name).lower() in BUILTIN
            if size is not None and d.transform == "encoder" and d.img_size is None and not builtin:
                opts = {"transform": self.transform()}
            else:
                opts = {"img_size": size}
            data = load_dataset(name, split, root=d.root, **opts)
            if d.canaries is not None and split == "train" and name == d.name:
                data = self._with_canaries(data)
            self._cache[key] = data
        return self._cache[key]

    def _with_canaries(self, data):
        """The train split with ``data.canaries`` appended (the same images for every stage)."""
        from memprune.data import WithCanaries, make_canaries

        c = self.recipe.data.canaries
        seed = self.recipe.seed if c.seed is None else c.seed
        return WithCanaries(data, make_canaries(data, c.n, c.kind, seed, c.strength))

    def input_size(self) -> int:
        """The image size data are loaded at (the built-in data sets are resized to it too):
        ``data.img_size``, else the encoder's (the recipe's, or what its checkpoint records)."""
        from memprune.encoders import input_size

        d, enc = self.recipe.data, self.recipe.encoder
        if d.img_size or enc.img_size or enc.pretrain is not None:
            return d.img_size or enc.img_size or 32
        return input_size(self.encoder((self.recipe.evaluation.encoders or ["f"])[0]))[1]

    def preprocessing(self, name: str | None = None) -> str:
        """How data set ``name`` (default: the run's) is turned into images, one way for
        every stage and encoder of the run (recorded beside the results)."""
        from memprune.data import BUILTIN, native_size

        name = self.recipe.data.name if name is None else name
        d, size = self.recipe.data, self.input_size()
        if str(name).lower() in BUILTIN:
            at = native_size(name, size)
            return f"built-in {name} at {at or 'its own size'} px"
        if d.transform == "encoder" and d.img_size is None:
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=self._transform_model())
            side = cfg["input_size"][-1]
            return (f"the encoder's eval preprocessing (timm): {cfg['interpolation']} resize to"
                    f" {math.floor(side / cfg['crop_pct'])}, centre crop {side}")  # fmt: skip
        return f"resize and centre crop to {size} px"

    def input_note(self) -> str:
        """Which input size the run uses and where it comes from (logged before it starts)."""
        d, enc = self.recipe.data, self.recipe.encoder
        size = self.input_size()
        if d.img_size:
            source = "data.img_size"
        elif enc.img_size:
            source = "encoder.img_size (--img-size)"
        elif enc.pretrain is not None:
            source = "the default; set encoder.img_size (--img-size) for another"
        else:
            source = ("what the encoder's checkpoint records (else its architecture's default);"
                      " --img-size for another")  # fmt: skip
        return f"input size: {size} px, from {source}; data: {self.preprocessing()}"

    def transform(self):
        """The encoder's eval preprocessing (from its timm data config): of the architecture
        the run trains, or of the first encoder it loads."""
        from memprune.encoders import eval_transform

        if "transform" not in self._cache:
            self._cache["transform"] = eval_transform(self._transform_model())
        return self._cache["transform"]

    def _transform_model(self):
        """The encoder whose eval preprocessing the run uses: the architecture it trains, or
        the first encoder it loads."""
        from memprune.encoders import create_encoder

        enc = self.recipe.encoder
        if enc.pretrain is not None or enc.random_init:
            return create_encoder(enc.model, img_size=enc.img_size, **enc.timm)
        return self.encoder((self.recipe.evaluation.encoders or ["f"])[0])

    @property
    def train(self):
        return self.dataset(self.recipe.data.name, "train")

    @property
    def probe_train(self):
        """The train split the probes fit on: without the canaries, whose labels mean nothing
        (a noise canary's is drawn at random), so that canaries change what the probes
        measure only through the encoder."""
        return getattr(self.train, "base", self.train) if self.recipe.data.canaries else self.train

    @property
    def test(self):
        return self.dataset(self.recipe.data.name, "test")

    def canary_spec(self) -> dict | None:
        """What makes this run's canaries' images (recorded in the split f trains on)."""
        c = self.recipe.data.canaries
        if c is None:
            return None
        seed = self.recipe.seed if c.seed is None else c.seed
        return {"n": c.n, "kind": c.kind, "seed": seed, "strength": c.strength}

    def splits(self):
        """The split f was trained on: the pretrain stage's, else the ``splits.json`` beside
        ``encoder.checkpoint`` (where ``memprune pretrain`` writes it); None if neither. Its
        canaries must be this run's (else a canary index would name another image)."""
        from memprune.data import Splits

        path = self.dir("pretrain") / "splits.json"
        enc = self.recipe.encoder
        if enc.pretrain is None and enc.checkpoint is not None:
            path = Path(enc.checkpoint).parent / "splits.json"
        if not path.is_file():
            if self.recipe.data.canaries is not None:
                raise ConfigError(
                    f"data.canaries: no splits.json at {path} says which canaries f was trained"
                    " with: name the f of a pair memprune trained (encoder.checkpoint)"
                )
            return None
        if path not in self._cache:
            splits = Splits.load(path)
            self._check_canaries(splits, path)
            self._cache[path] = splits
        return self._cache[path]

    def _check_canaries(self, splits, path: Path) -> None:
        """The split must index this run's train split: with ``data.canaries``, the canaries
        f was trained with; without, the base points (a split's canaries come after them)."""
        spec, n = self.canary_spec(), len(self.train)
        if spec is not None and not splits.canaries:
            raise ConfigError(
                f"data.canaries is set but f was trained without canaries ({path}): remove"
                " data.canaries, or use an f trained with them"
            )
        recorded = splits.canary_spec
        if spec is not None and recorded is not None and recorded != spec:
            raise ConfigError(
                f"data.canaries make {spec}, but f was trained with canaries {recorded}"
                f" ({path}): copy data.canaries from the recipe that trained f"
            )
        expected = splits.n if spec is not None else splits.n - len(splits.canaries)
        if expected != n:
            raise ConfigError(
                f"{path} splits {expected} points but this run's train split has {n}"
                f"{' with its canaries' if spec else ''}: use the data (and data.canaries) f was"
                " trained on"
            )

    def indices(self, cfg, key: str, default_part: str | None) -> tuple[object, list | None]:
        """The data set and indices of a :class:`PointsCfg` (``key`` names it in errors):
        its file's indices, a part of the pretrain split, or all points (None)."""
        from memprune.data import read_indices

        data = self.dataset(self.recipe.data.name, cfg.split if cfg else "train")
        part = cfg.part if cfg else default_part
        if cfg is not None and cfg.indices is not None:
            try:
                idx = read_indices(cfg.indices, part)
            except ConfigError as err:
                raise ConfigError(f"{key}.indices: {err}") from None
        elif part is not None and self.splits() is not None:
            idx = self.splits().indices(part)
        elif cfg is not None and part is not None:
            raise ConfigError(f"{key}.part: names a set of a splits.json; give {key}.indices")
        else:
            idx = None
        if idx is not None:
            bad = [i for i in idx if not 0 <= i < len(data)]
            if bad:
                raise ConfigError(f"{key}: indices {bad[:5]} are outside the"
                                  f" {cfg.split if cfg else 'train'} split of {len(data)}"
                                  " points")  # fmt: skip
        return data, idx

    def points(self, key: str):
        """``data.members`` or ``data.nonmembers`` as a data set (defaults with a pretrain
        stage: the candidates, the extras), restricted to ``n_points`` drawn by seed."""
        from memprune.data import seeded_subset

        default = {"members": "candidate", "nonmembers": "extra"}[key]
        cfg = getattr(self.recipe.data, key)
        data, idx = self.indices(cfg, f"data.{key}", default)
        if idx is not None:
            data = torch.utils.data.Subset(data, idx)
        return seeded_subset(data, cfg.n_points if cfg else None, self.recipe.seed)

    # ------------------------------------------------------------ encoders

    def encoder(self, which: str):
        """``f``, ``g``, ``supervised`` (from the run or the recipe's checkpoints) or a
        checkpoint path, loaded once."""
        from memprune.encoders import load_encoder

        if which in self._cache:
            return self._cache[which]
        enc = self.recipe.encoder
        if enc.pretrain is not None and which in ("f", "g"):
            model = load_encoder(checkpoint=self.dir("pretrain") / which)
        elif which == "supervised":
            model = load_encoder(checkpoint=self.dir("supervised"))
        elif which == "f" and enc.random_init:
            torch.manual_seed(self.recipe.seed)  # a rerun scores the same encoder
            model = load_encoder(enc.model, img_size=enc.img_size, mean=enc.mean, std=enc.std,
                                 **enc.timm)  # fmt: skip
        else:
            path = {"f": enc.checkpoint, "g": enc.reference}.get(which, which)
            model = load_encoder(enc.model, checkpoint=path, img_size=enc.img_size,
                                 trust_pickle=enc.trust_pickle, entry=enc.entry,
                                 strict=enc.strict, mean=enc.mean, std=enc.std,
                                 **enc.timm)  # fmt: skip
        self._cache[which] = model
        return model

    def model_name(self, which: str = "f") -> str:
        """The timm name of an encoder (for tables and metadata)."""
        model = self.encoder(which)
        build = (getattr(model, "pretrained_cfg", None) or {}).get("memprune_build") or {}
        return build.get("model") or self.recipe.encoder.model or type(model).__name__

    def checkpoint(self, which: str = "f") -> str | None:
        """Where encoder ``which`` comes from (None: random init)."""
        enc = self.recipe.encoder
        if enc.pretrain is not None and which in ("f", "g"):
            return str(self.dir("pretrain") / which)
        if which == "supervised":
            return str(self.dir("supervised"))
        return {"f": enc.checkpoint, "g": enc.reference}.get(which, which)

    # ------------------------------------------------------------ results of earlier stages

    def result(self, stage: str, name: str, given: str | None = None):
        """A result an earlier stage saved (``RUN/<stage>/<name>``), or the one at ``given``
        (a result stem, its ``.json``, or a directory holding ``name`` directly or in
        ``<stage>/``)."""
        import memprune.scores  # noqa: F401  (the result classes load_any chooses from)
        from memprune.results import load_any

        if given is None:
            return load_any(self.dir(stage) / name)
        return load_any(find_result(given, stage, name))


def find_result(given: str, stage: str, name: str) -> Path:
    """The stem of a saved result named by a user: a stem, a ``.json`` / ``.safetensors``,
    a CLI verb's ``--out`` or a run directory."""
    path = Path(given)
    if path.is_dir():
        for stem in (path / name, path / stage / name):
            if stem.with_suffix(".json").is_file():
                return stem
        raise ConfigError(
            f"no {name} result in {given}: pass the --out of the command that made it (or its"
            f" {name}.json)"
        )
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    if not stem.with_suffix(".json").is_file():
        there = "" if path.exists() else ": nothing is there"
        raise ConfigError(
            f"no saved {name} result at {given}{there}; pass the --out of the command that made"
            f" it, or its {name}.json"
        )
    return stem
