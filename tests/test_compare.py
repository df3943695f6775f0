import copy
import importlib.util
import os
import stat

import pytest
import torch

from memprune.errors import ConfigError
from memprune.pruning import compare_pruning, mark_pareto
from memprune.pruning._export import export_encoder, exported_module

from .conftest import tiny_resnet, tiny_vit
from .test_prune import planted


def test_pareto_front_is_the_set_no_other_point_dominates():
    rows = [
        {"params": 100, "macs": 10, "accuracy": 0.9},  # the largest and best: on both fronts
        {"params": 50, "macs": 20, "accuracy": 0.8},  # beaten on MACs by the first
        {"params": 50, "macs": 6, "accuracy": 0.7},  # same params as the second, worse
        {"params": 20, "macs": 5, "accuracy": 0.7},  # dominates the third on both
        {"params": 20, "macs": 5, "accuracy": 0.7},  # a tie is not dominated
    ]
    front = [r["pareto"] for r in mark_pareto(rows)]
    assert front == ["params,macs", "params", "", "params,macs", "params,macs"]


class _Counted:
    """evaluate / recover with known answers: accuracy = 0.5 + the recovery's seed / 100."""

    def __init__(self):
        self.recovered = []

    def evaluate(self, model):
        return 0.5 + getattr(model, "bonus", 0.0)

    def recover(self, model, seed):
        self.recovered.append((seed, model.layer2[0].conv1.out_channels))
        out = copy.deepcopy(model)
        out.bonus = seed / 100
        return out


def test_sweep_runs_seeds_only_where_randomness_enters(tmp_path):
    model = tiny_resnet()
    fake = _Counted()

    def recover(m, seed):
        return fake.recover(m, seed)

    recover.method = "distill"  # as memprune.pruning.recovery_fn names its method
    rows, runs = compare_pruning(
        model, planted(model), fake.evaluate, [0.5], ["lowest", "random"], tmp_path,
        recover=recover, seeds=[0, 1, 2], steps=[1, 2], log=lambda m: None,
        latency_batch=None,
    )  # fmt: skip
    by = {(r["strategy"], r["steps"], r["recovery"]): r for r in rows}
    assert rows[0]["strategy"] == "none" and rows[0]["accuracy"] == 0.5
    # deterministic one-shot pruning runs once; its recovery once per seed
    assert by["lowest", 1, "none"]["seeds"] == 1 and by["lowest", 1, "none"]["std"] == 0
    rec = by["lowest", 1, "distill"]
    assert rec["seeds"] == 3 and rec["accuracy"] == pytest.approx(0.51)
    assert rec["std"] == pytest.approx(0.01)
    # random pruning and iterative schedules with recovery: once per seed
    assert by["random", 1, "none"]["seeds"] == 3 and by["lowest", 2, "none"]["seeds"] == 3
    # a two-step schedule recovers between the steps (at 12 of 16 units) and after
    # (at 8), and ends at the one-shot widths
    assert fake.recovered.count((0, 12)) == 2  # lowest x2 and random x2, seed 0
    assert by["lowest", 2, "distill"]["params"] == by["lowest", 1, "none"]["params"]
    assert len(rows) == 1 + 2 * 2 * 2
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert "lowest_0.5" in saved and "lowest_0.5_distill_s2" in saved
    assert "random_0.5_x2_s1" in saved and "random_0.5_x2_s1_distill" in saved
    assert len(runs) == len(saved)
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        compare_pruning(model, None, fake.evaluate, [0.5], ["random"], seeds=[1, 1])
    with pytest.raises(ConfigError, match="pass models_dir"):
        compare_pruning(model, None, fake.evaluate, [0.5], ["random"], export=True)


@pytest.mark.parametrize("make", [tiny_resnet, tiny_vit])
def test_exported_program_matches_the_eager_pruned_encoder(tmp_path, make):
    from memprune import prune

    model = make()
    pruned, _ = prune(model, ratio=0.5, strategy="magnitude", latency_batch=None,
                      keep_output_width=make is tiny_resnet)  # fmt: skip
    out = export_encoder(pruned, tmp_path / "e")
    assert out["max_abs_diff"] <= 1e-4
    program = exported_module(tmp_path / "e")
    x = torch.randn(5, *pruned.pretrained_cfg["input_size"])  # another batch size
    with torch.no_grad():
        torch.testing.assert_close(program(x), pruned.eval()(x), atol=1e-5, rtol=1e-5)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(out["program"]).st_mode) == 0o666 & ~mask  # as open() makes
    if importlib.util.find_spec("onnx") is None:
        with pytest.raises(ConfigError, match=r"memprune\[onnx\]"):
            export_encoder(pruned, tmp_path / "o", onnx=True)


def test_verdicts_name_the_winner_its_lead_and_the_spread():
    from memprune.pruning import prune_verdicts

    def row(strategy, ratio, accuracy, std=0.0, seeds=1, recovery="none", params=50):
        return {"strategy": strategy, "ratio": ratio, "steps": 1, "recovery": recovery,
                "accuracy": accuracy, "std": std, "seeds": seeds, "params": params,
                "params_ratio": params / 100, "macs_ratio": params / 100}  # fmt: skip

    rows = [
        row("none", 0.0, 0.90, params=100),
        row("lowest", 0.5, 0.895), row("magnitude", 0.5, 0.85),
        row("lowest", 0.5, 0.88, 0.01, 3, "distill"), row("random", 0.5, 0.80, 0.01, 3, "distill"),
        row("lowest", 0.7, 0.70, params=30), row("magnitude", 0.7, 0.70, params=30),
        row("random", 0.7, 0.86, 0.05, 3, "distill", 30), row("lowest", 0.7, 0.84, 0.05, 3,
                                                              "distill", 30),
    ]  # fmt: skip
    text = "\n".join(prune_verdicts(rows))
    assert (
        "lowest: removing 50% of units, the most of the ratios tried that keeps accuracy"
        " within 1 point of the unpruned 90.0%, gives 89.5%"
    ) in text
    assert "magnitude: every ratio tried loses more than 1 point of accuracy" in text
    assert (
        "50% removed, without recovery: lowest wins with 89.5%, 4.5 points over magnitude;"
        " not judged against a seed spread (lowest: deterministic, one encoder; magnitude:"
        " deterministic, one encoder)" in text
    )
    one_seed = [rows[0], row("random", 0.5, 0.225), row("lowest", 0.5, 0.20)]
    line = prune_verdicts(one_seed)[-1]  # random pruning with one seed is not deterministic
    assert "(random: one seed; lowest: deterministic, one encoder)" in line
    assert (
        "50% removed, after distill: lowest wins with 88.0%, 8.0 points over random; beyond" in text
    )
    assert "70% removed, without recovery: lowest, magnitude tie at 70.0%" in text
    # a 2-point lead with std 5 over 3 seeds each: 2 SE = 8.2 points
    assert (
        "70% removed, after distill: random wins with 86.0%, 2.0 points over lowest; within"
        " the seed spread (2 SE = 8.2 points)" in text
    )


def test_sweep_exports_and_times_every_program_beside_the_eager_one(tmp_path):
    model = tiny_resnet(img_size=32)
    rows, runs = compare_pruning(
        model, None, lambda m: 0.5, [0.5], ["magnitude"], tmp_path, export=True,
        latency_batch=4, latency_time=0.02, log=lambda m: None,
    )  # fmt: skip
    assert all(r["latency_export_ms"] > 0 and r["latency_ms"] > 0 for r in rows)
    assert runs[0]["export"]["program"] == "models/magnitude_0.5/encoder.pt2"
    assert (tmp_path / "magnitude_0.5" / "encoder.pt2").is_file()


def test_a_sweep_exports_the_recovered_encoders_too(tmp_path):
    """The recovered encoder is the one a user ships: it is exported beside its weights, and
    the program computes what the recovered weights compute."""
    model = tiny_resnet(img_size=32)

    def recover(pruned, seed):  # a stand-in recovery that changes the weights
        out = copy.deepcopy(pruned)
        with torch.no_grad():
            for p in out.parameters():
                p.mul_(1.1)
        return out

    _, runs = compare_pruning(model, None, lambda m: 0.5, [0.5], ["magnitude"], tmp_path,
                              export=True, recover=recover, seeds=[0], latency_batch=None,
                              log=lambda m: None)  # fmt: skip
    rec = next(r for r in runs if r["recovery"] != "none")
    assert rec["export"]["program"] == f"{rec['model_dir']}/encoder.pt2"
    where = tmp_path / rec["model_dir"].split("/", 1)[1]
    x = torch.rand(2, 3, 32, 32)
    from memprune.pruning import load_pruned

    torch.testing.assert_close(exported_module(where)(x), load_pruned(where)(x))
