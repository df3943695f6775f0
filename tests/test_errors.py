"""Bad input, as a user would give it: one line naming the value and the fix, exit 2 in the CLI
(a MemPruneError in the API), no traceback, and nothing written."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import Subset, TensorDataset

import memprune
from memprune.cli import main
from memprune.errors import MemPruneError

from .conftest import tiny_resnet

TINY = ["--timm", "channels=[8,16,32,64]"]


def _folder(root, classes=("a", "b"), n=3, color=None, corrupt=False):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            rgb = color if color is not None else (40 * i, 100, 30 * len(c))
            Image.new("RGB", (12, 12), rgb).save(root / c / f"{i}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def _weights(path, model=None):
    model = model or tiny_resnet()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _units(tmp, *extra):
    return ["score", "units", "--max-points", "8", "--views", "1", *TINY, *extra,
            "--out", str(tmp / "out")]  # fmt: skip


def c_unknown_model(tmp):
    return ["sites", "--model", "resnt18"], "closest timm names: resnet18"


def c_unknown_data(tmp):
    return _units(tmp, "--data", "digitz"), "unknown data set 'digitz'"


def c_absent_checkpoint(tmp):
    return _units(tmp, "--checkpoint", str(tmp / "nope.safetensors")), "nope.safetensors"


def c_truncated_safetensors(tmp):
    path = _weights(tmp / "w.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _units(tmp, "--checkpoint", str(path)), "cannot read checkpoint"


def c_corrupt_safetensors(tmp):
    (tmp / "c.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    return _units(tmp, "--checkpoint", str(tmp / "c.safetensors")), "cannot read checkpoint"


def c_empty_pth(tmp):
    (tmp / "e.pth").write_bytes(b"")
    return _units(tmp, "--checkpoint", str(tmp / "e.pth")), "is empty"


def c_text_pth(tmp):
    (tmp / "t.pth").write_text("hello, I am not a checkpoint\n")
    return _units(tmp, "--checkpoint", str(tmp / "t.pth")), "not a torch or safetensors"


def c_pickled_module(tmp):
    torch.save(tiny_resnet(), tmp / "m.pt")
    return _units(tmp, "--checkpoint", str(tmp / "m.pt")), "pickled"


def c_other_architecture(tmp):
    vit = memprune.load_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    path = _weights(tmp / "vit.safetensors", vit)
    return _units(tmp, "--checkpoint", str(path)), "holds no weights of a ResNet"


def c_other_width(tmp):
    path = _weights(tmp / "wide.safetensors", memprune.load_encoder("resnet18"))
    return _units(tmp, "--checkpoint", str(path)), "shape"


def c_nan_weights(tmp):
    model = tiny_resnet()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = math.nan
    return _units(tmp, "--checkpoint", str(_weights(tmp / "nan.safetensors", model))), "NaN"


def c_views_zero(tmp):
    return [*_units(tmp), "--views", "0"], "--views: 0 is below the minimum 1"


def c_views_negative(tmp):
    return [*_units(tmp), "--views", "-3"], "--views: -3 is below the minimum 1"


def c_views_huge(tmp):
    return [*_units(tmp), "--views", "100000"], "100000 views per point is more than 1024"


def c_batch_zero(tmp):
    return [*_units(tmp), "--chunk-size", "0"], "--chunk-size: 0 is below the minimum 1"


def c_max_points_negative(tmp):
    return [*_units(tmp), "--max-points", "-5"], "--n-points: -5 is below the minimum 1"


def c_unknown_choice(tmp):
    return [*_units(tmp), "--rest", "mode"], "invalid choice: 'mode'"


def c_bad_timm_arg(tmp):
    return _units(tmp, "--timm", "channels"), "--timm takes KEY=VALUE"


def c_empty_folder(tmp):
    (tmp / "empty" / "a").mkdir(parents=True)
    return _units(tmp, "--data", str(tmp / "empty")), "no images"


def c_corrupt_image(tmp):
    folder = _folder(tmp / "corrupt", corrupt=True)
    return _units(tmp, "--data", str(folder), "--img-size", "16"), "broken.png"


def c_one_class_classmem(tmp):
    folder = _folder(tmp / "one", classes=("a",))
    args = ["score", "classes", *TINY, "--data", str(folder), "--img-size", "16",
            "--out", str(tmp / "out")]  # fmt: skip
    return args, "at least 2 classes"


def c_one_class_probe(tmp):
    folder = tmp / "one"
    _folder(folder / "train", classes=("a",))
    _folder(folder / "test", classes=("a",))
    return ["probe", *TINY, "--data", str(folder), "--img-size", "16", "--out",
            str(tmp / "out")], "at least 2 classes"  # fmt: skip


def c_out_is_file(tmp):
    (tmp / "file").write_text("x")
    return ["score", "units", *TINY, "--out", str(tmp / "file")], "is not a directory"


def c_out_under_file(tmp):
    (tmp / "file").write_text("x")
    return ["score", "units", *TINY, "--out", str(tmp / "file" / "sub")], "is a file"


def c_device_cuda(tmp):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    return [*_units(tmp), "--device", "cuda"], "no CUDA GPU"


def c_device_unknown(tmp):
    return [*_units(tmp), "--device", "tpu7"], "--device 'tpu7'"


def c_ratio_one(tmp):
    return [
        "prune",
        *TINY,
        "--ratio",
        "1.0",
        "--out",
        str(tmp / "out"),
    ], "--ratio[0]: 1.0 must be below 1"


def c_ratio_negative(tmp):
    return [
        "prune",
        *TINY,
        "--ratio",
        "-0.1",
        "--out",
        str(tmp / "out"),
    ], "--ratio[0]: -0.1 is below the minimum 0"


def c_prune_scores_of_another_checkpoint(tmp):
    a, b = _weights(tmp / "a.safetensors"), _weights(tmp / "b.safetensors")
    scores = memprune.unit_mem(tiny_resnet(), Subset(memprune.load_dataset(), range(6)),
                               n_views=1, sites="layer4.*")  # fmt: skip
    scores.meta.update(model="resnet18", checkpoint=str(a))
    scores.save(tmp / "scores" / "unitmem")
    args = ["prune", *TINY, "--checkpoint", str(b), "--scores", str(tmp / "scores"),
            "--out", str(tmp / "out")]  # fmt: skip
    return args, "were computed on checkpoint"


def _scored(tmp, score=memprune.unit_mem, edit=None, on=None):
    """A checkpoint ``a`` and scores saved at tmp/scores (computed on ``on``, default a's own
    weights; ``edit`` changes the saved tensors), as `prune --scores` would read them."""
    from safetensors.torch import load_file

    a = _weights(tmp / "a.safetensors")
    model = on or memprune.load_encoder("resnet18", checkpoint=str(a), channels=(8, 16, 32, 64))
    result = score(model, Subset(memprune.load_dataset(), range(6)), n_views=1, sites="layer4.*")
    result.meta.update(checkpoint=str(a))
    stem = tmp / "scores" / result.kind
    result.save(stem)
    if edit is not None:
        tensors = load_file(stem.with_suffix(".safetensors"))
        edit(tensors)
        save_file(tensors, str(stem.with_suffix(".safetensors")))
    args = ["prune", *TINY, "--checkpoint", str(a), "--scores", str(stem),
            "--latency-batch", "0", "--out", str(tmp / "out")]  # fmt: skip
    return args


def c_prune_scores_of_other_weights(tmp):  # another init, or the checkpoint overwritten since
    torch.manual_seed(1)
    other = memprune.load_encoder("resnet18", channels=(8, 16, 32, 64))
    return _scored(tmp, on=other), "computed on an encoder with other weights"


def c_prune_scores_with_nan(tmp):
    def edit(t):
        t["layer4.0.act1/score"][3] = math.nan

    return _scored(tmp, edit=edit), "site 'layer4.0.act1' has 1 non-finite UnitMem scores"


def c_prune_scores_out_of_range(tmp):
    def edit(t):
        t["layer4.1.act2/score"][0] = 5.0

    return _scored(tmp, edit=edit), "UnitMem scores outside [0, 1] (min"


def c_prune_classmem_as_unitmem(tmp):
    def class_mem(model, data, n_views, sites):
        return memprune.class_mem(model, data, n_views=n_views, sites=sites)

    return _scored(tmp, score=class_mem), "but the scores are a classmem result"


def c_prune_scores_files_that_disagree(tmp):  # a site the .safetensors lacks
    def edit(t):
        for key in [k for k in t if k.startswith("layer4.0.act1/")]:
            t[key.replace("act1/", "actX/")] = t.pop(key)

    return _scored(tmp, edit=edit), "the two files were not saved together"


def c_recover_batch_above_the_data(tmp):  # refused before any stage runs
    args = ["prune", *TINY, "--recover", "distill", "--recover-batch-size", "5000", "--out",
            str(tmp / "out")]  # fmt: skip
    return args, "recover.batch_size 5000 exceeds the 1437 training points"


def _prune_args(tmp, *extra, model=TINY):
    return ["prune", *model, "--ratio", "0.3", "--latency-batch", "0", "--views", "1",
            "--max-points", "50", *extra, "--out", str(tmp / "out")]  # fmt: skip


VIT = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--timm", "patch_size=8",
       "depth=1", "embed_dim=32", "num_heads=2"]  # fmt: skip


def c_prune_seeds_repeated(tmp):
    return _prune_args(
        tmp, "--strategy", "random", "--seeds", "0", "0"
    ), "--seeds: [0, 0] repeats 0"


def c_prune_ratios_repeated(tmp):
    args = _prune_args(tmp, "--strategy", "random")
    i = args.index("--ratio")
    args[i + 1 : i + 2] = ["0.3", "0.3"]
    return args, "--ratio: [0.3, 0.3] repeats 0.3; list each once"


def c_prune_bnscale_on_a_vit(tmp):
    return _prune_args(tmp, "--strategy", "bnscale", model=VIT), "bnscale"


def c_prune_heads_on_a_cnn(tmp):
    return _prune_args(tmp, "--strategy", "random", "--heads"), "--heads: resnet18 has no attention"


def c_device_cuda_absent(tmp):  # this machine has no GPU (CI neither)
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    return _prune_args(tmp, "--strategy", "random", "--device", "cuda"), "cuda"


def c_img_size_zero(tmp):
    return [*_units(tmp), "--img-size", "0"], "--img-size: 0 is below the minimum 1"


def c_latency_batch_negative(tmp):
    return _prune_args(tmp, "--latency-batch", "-1"), "--latency-batch: -1 is below the minimum 0"


def c_lr_infinite(tmp):
    return ["finetune", "--f", "x", "--lr", "inf", "--out", str(tmp / "out")], (
        "--lr: inf must be a finite number"
    )


def c_lr_zero(tmp):
    return ["finetune", "--f", "x", "--lr", "0", "--out", str(tmp / "out")], (
        "--lr: 0.0 must be above 0"
    )


def _split_folder(root, counts):
    """train/ and test/ of 12-px images, ``counts`` images per class in each."""
    for split in ("train", "test"):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (40 * i, 100, 60 * len(c))).save(
                    root / split / c / f"{i}.png"
                )
    return str(root)


def c_probe_too_few_points_to_choose_c(tmp):
    data = _split_folder(tmp / "imgs", {"a": 2, "b": 2})
    args = ["probe", *TINY, "--data", data, "--out", str(tmp / "out")]
    return args, "too few for its 2 classes: give it more training points, or one C"


def c_probe_too_few_points_to_choose_k(tmp):
    data = _split_folder(tmp / "imgs", {"a": 2, "b": 2})
    args = ["probe", *TINY, "--data", data, "--cs", "1.0", "--out", str(tmp / "out")]
    return args, "leave the kNN probe out (evaluation.knn: false; CLI --no-knn)"


def c_prune_too_few_points_to_choose_c(tmp):
    data = _split_folder(tmp / "imgs", {"a": 2, "b": 2})
    return _prune_args(tmp, "--strategy", "random", "--data", data), "CLI --cs 1.0"


def c_finetune_batch_of_one(tmp):
    return ["finetune", "--f", "x", "--batch-size", "1", "--out", str(tmp / "out")], (
        "--batch-size: 1 is below the minimum 2"
    )


def _recipe_file(tmp, text):
    (tmp / "r.yaml").write_text(text)
    return ["run", str(tmp / "r.yaml"), "--out", str(tmp / "out")]


def c_recipe_key_twice(tmp):
    text = "name: x\nactions:\n  prune: {ratios: [0.3]}\nactions:\n  finetune: {k: [1]}\n"
    return _recipe_file(tmp, text), "line 4: key 'actions' is given twice in one mapping"


def c_recipe_yaml_syntax(tmp):
    return _recipe_file(tmp, "name: x\nactions: [\n"), "is not valid YAML at line 3, column 1"


def c_recipe_empty(tmp):
    return _recipe_file(tmp, ""), "is empty: start from one in recipes/"


def c_recipe_name_a_path(tmp):
    return _recipe_file(tmp, "name: /abs/path\n"), "name: '/abs/path' names the run's folder"


def c_prune_scores_missing(tmp):
    args = _prune_args(tmp, "--strategy", "lowest", "--scores", str(tmp / "nope"))
    return args, f"no saved unitmem result at {tmp / 'nope'}: nothing is there; pass the --out"


def c_prune_onnx_without_onnx(tmp):
    import importlib.util

    if importlib.util.find_spec("onnx") is not None:
        pytest.skip("onnx is installed here")
    return _prune_args(tmp, "--strategy", "random", "--export", "--onnx"), "onnx"


def c_recipe_device_cuda_absent(tmp):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    return _recipe_file(tmp, "name: x\ndevice: cuda\n"), "cuda"


def c_finetune_too_few_points(tmp):
    data = _split_folder(tmp / "imgs", {"a": 2, "b": 2})
    f = str(_weights(tmp / "f.safetensors"))
    args = [
        "finetune",
        "--model",
        "resnet18",
        *TINY,
        "--f",
        f,
        "--data",
        data,
        "--k",
        "1",
        "--strategy",
        "last",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(tmp / "out"),
    ]
    return args, "too few for its 2 classes"


def c_finetune_unit_scores_missing(tmp):
    f = str(_weights(tmp / "f.safetensors"))
    args = ["finetune", "--model", "resnet18", *TINY, "--f", f, "--unit-scores",
            str(tmp / "nope"), "--by", "unitmem", "--out", str(tmp / "out")]  # fmt: skip
    return args, "--unit-scores: no LayerMem, member-gap or UnitMem result at"


def c_finetune_k_zero(tmp):
    return [
        "finetune",
        "--f",
        "x",
        "--k",
        "0",
        "--out",
        str(tmp / "out"),
    ], "--k[0]: 0 is below the minimum 1"


def c_epochs_zero(tmp):
    return [
        "pretrain",
        *TINY,
        "--epochs",
        "0",
        "--out",
        str(tmp / "out"),
    ], "--epochs: 0 is below the minimum 1"


def c_simclr_batch_one(tmp):
    return [
        "pretrain",
        *TINY,
        "--batch-size",
        "1",
        "--out",
        str(tmp / "out"),
    ], "--batch-size: 1 is below the minimum 2"


def c_pretrain_resume_not_a_run(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return ["pretrain", *TINY, "--resume", "--out", str(tmp / "out")], "drop --resume"


def c_same_f_and_g(tmp):
    path = str(_weights(tmp / "f.safetensors"))
    args = ["score", "layers", "--f", path, "--g", path, "--model", "resnet18", *TINY,
            "--out", str(tmp / "out")]  # fmt: skip
    return args, "the same encoder"


def c_layers_n_points_negative(tmp):
    path = str(_weights(tmp / "f.safetensors"))
    g = str(_weights(tmp / "g.safetensors"))
    args = ["score", "layers", "--f", path, "--g", g, "--model", "resnet18", *TINY,
            "--n-points", "-1", "--out", str(tmp / "out")]  # fmt: skip
    return args, "--n-points: -1 is below the minimum 1"


def c_run_resume_not_a_run(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return ["run", "recipes/digits-resnet.yaml", "--resume", "--out", str(tmp / "out")], (
        "not a memprune run")  # fmt: skip


def c_recipe_unknown_model(tmp):
    return ["run", "recipes/digits-resnet.yaml", "--set", "encoder.model=resnt18", "--out",
            str(tmp / "out")], "resnt18"  # fmt: skip


def c_recipe_unknown_data(tmp):
    return ["run", "recipes/digits-resnet.yaml", "--set", "data.name=digitz", "--out",
            str(tmp / "out")], "digitz"  # fmt: skip


def c_recipe_missing_file(tmp):
    return ["run", str(tmp / "none.yaml")], "none.yaml"


def c_report_not_a_run(tmp):
    (tmp / "out").mkdir()
    return ["report", str(tmp / "out")], "not a memprune run"


CLI_CASES = [v for k, v in sorted(globals().items()) if k.startswith("c_")]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda f: f.__name__[2:])
def test_cli_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parents[1])
    argv, expected = case(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert expected in err, err
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, f"{argv} left {set(after) - set(before)} behind"


# ------------------------------------------------------------------------------------- API


def test_api_bad_input_raises_memprune_errors(tmp_path, digits):
    from memprune.probe import LinearProbe
    from memprune.pruning import load_pruned, prune, save_pruned

    model = tiny_resnet()
    cases = {
        "checkpoint=123": lambda: memprune.load_encoder("resnet18", checkpoint=123),
        "plain (x, y) data": lambda: memprune.unit_mem(
            model, TensorDataset(torch.rand(4, 3, 32, 32), torch.arange(4)), n_views=1
        ),
        "NaN image": lambda: memprune.unit_mem(model, _NaNImages(digits), n_views=1),
        "NaN features": lambda: LinearProbe("sklearn").fit(
            torch.full((10, 3), math.nan), torch.arange(10) % 2
        ),
        "save_pruned onto a file": lambda: save_pruned(model, _touch(tmp_path / "f")),
        "pruned weights without their directory": lambda: load_pruned(
            _pruned_weights(tmp_path, model)
        ),
        "prune ratio 1": lambda: prune(model, None, 1.0, "random"),
        "n_views 0": lambda: memprune.unit_mem(model, Subset(digits, range(4)), n_views=0),
        "one point": lambda: memprune.unit_mem(model, Subset(digits, range(1)), n_views=1),
        "empty data": lambda: memprune.unit_mem(model, Subset(digits, []), n_views=1),
    }
    for name, call in cases.items():
        with pytest.raises(MemPruneError) as info:
            call()
        message = str(info.value)
        assert message and "\n" not in message, (name, message)


def test_the_fix_for_plain_data_works():
    from memprune.data import IndexedDataset

    data = IndexedDataset(TensorDataset(torch.rand(4, 3, 32, 32), torch.arange(4)))
    result = memprune.unit_mem(tiny_resnet(), data, n_views=1, sites="layer4.*")
    assert result.meta["n_points"] == 4


class _NaNImages(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return 4

    def __getitem__(self, i):
        image, label, index = self.data[i]
        return image * (math.nan if i == 2 else 1.0), label, index


def _touch(path):
    path.write_text("x")
    return path


def _pruned_weights(tmp_path, model):
    from memprune.pruning import prune, save_pruned

    pruned, _ = prune(model, None, 0.5, "random", latency_batch=None)
    save_pruned(pruned, tmp_path / "pruned")
    return tmp_path / "pruned" / "encoder.safetensors"


def test_recipe_bad_input_leaves_no_run_directory(tmp_path):
    from memprune.recipes import load_recipe, run_recipe

    root = __import__("pathlib").Path(__file__).parents[1]
    recipe = load_recipe(root / "recipes/digits-resnet.yaml", ["encoder.model=resnt18"])
    with pytest.raises(MemPruneError, match="resnt18"):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_all_black_images_give_finite_scores(tmp_path):
    """Identical (black) images: every unit fires equally for every point, so UnitMem is 0 (and
    units that never fire are dead), never NaN."""
    folder = _folder(tmp_path / "black", color=(0, 0, 0), n=4)
    out = tmp_path / "out"
    argv = _units(tmp_path, "--data", str(folder), "--img-size", "16")[:-2]
    assert main([*argv, "--out", str(out)]) == 0
    result = memprune.UnitMemResult.load(out / "unitmem")
    scores = torch.cat([s["score"] for s in result.sites.values()])
    assert torch.isfinite(scores).all() and scores.abs().max() < 1e-6
