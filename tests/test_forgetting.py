"""What pruning forgets, example by example: flips of the probe's per-example outcomes, how a
per-point score predicts them, and McNemar's test, on constructed encoders with known answers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import Dataset

import memprune
from memprune.errors import ConfigError
from memprune.probe import flip_auc, flips, linear_probe, mcnemar, top_share


class Points(Dataset):
    """Feature vectors as 'images' ``[4, 1, 1]``, items ``(image, label, index)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.labels = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].view(4, 1, 1), int(self.labels[i]), i


class Identity(torch.nn.Module):
    """An encoder whose units are the input features (site ``act``)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = torch.nn.Identity()
        self.num_features = 4
        self.pretrained_cfg = {"architecture": "identity", "input_size": (4, 1, 1)}

    def forward(self, x):
        return self.act(x.flatten(1))


def _points(n: int, served: int, seed: int) -> Points:
    """Feature 0 gives the class (+-1); ``served`` points of class 1 carry -1 in feature 0, as
    class 0 does, and +3 in feature 1: only unit 1 tells them apart. Features 2 and 3 are 0.
    ``seed`` shifts feature 1 a little (another draw of the same construction)."""
    y = torch.arange(n) % 2
    x = torch.zeros(n, 4)
    x[:, 0] = 2.0 * y - 1
    ones = torch.nonzero(y == 1).flatten()[:served]
    x[ones, 0], x[ones, 1] = -1.0, 3.0 + 0.1 * seed
    return Points(x, y)


@pytest.fixture(scope="module")
def probes():
    train, test = _points(200, 40, seed=0), _points(100, 20, seed=1)
    run = dict(Cs=[10.0], progress=False, normalize=None)
    f = Identity()
    base = linear_probe(f, train, test, **run)
    served = memprune.ablate(f, {"act": [1]})  # the units that alone serve the 20 points
    idle = memprune.ablate(f, {"act": [2]})  # a unit that carries nothing
    return (
        test,
        base,
        linear_probe(served, train, test, **run),
        linear_probe(idle, train, test, **run),
    )


def test_exactly_the_points_served_by_the_pruned_units_are_forgotten(probes):
    test, base, served, _ = probes
    assert base.accuracy == 1.0
    fl = flips(base, served)
    expected = test.x[:, 1] > 0
    assert torch.equal(fl.forgotten, expected) and not fl.learned.any()
    assert fl.counts() == {"n_test": 100, "forgotten": 20, "learned": 0, "net_forgotten": 20,
                           "flip_rate": 0.2}  # fmt: skip
    score = test.x[:, 1] + 0.001 * torch.arange(100)  # a score that knows which are served
    assert flip_auc(fl.forgotten, score) == 1.0
    assert flip_auc(fl.forgotten, -score) == 0.0
    assert top_share(fl.forgotten, score, top=0.2) == 1.0
    m = mcnemar(base, served)
    assert m["a_only"] == 20 and m["b_only"] == 0 and m["p"] == pytest.approx(2 * 0.5**20)


def test_a_flip_free_pruning_has_no_flips_and_an_undefined_auc(probes):
    test, base, _, idle = probes
    fl = flips(base, idle)
    assert fl.counts()["forgotten"] == 0 and fl.counts()["learned"] == 0
    assert flip_auc(fl.forgotten, test.x[:, 1]) is None  # undefined, reported as such
    assert top_share(fl.forgotten, test.x[:, 1]) is None
    assert mcnemar(base, idle) == {"a_only": 0, "b_only": 0, "p": 1.0}


def test_per_example_predictions_survive_save_and_load(probes, tmp_path):
    _, base, served, _ = probes
    served.save(tmp_path / "probe")
    back = memprune.probe.ProbeResult.load(tmp_path / "probe")
    assert torch.equal(back.predictions, served.predictions)
    assert torch.equal(flips(base, back).forgotten, flips(base, served).forgotten)


def test_probes_on_other_points_are_refused(probes):
    _, base, _, _ = probes
    other = linear_probe(Identity(), _points(200, 40, 0), _points(50, 10, 2), Cs=[10.0],
                         progress=False, normalize=None)  # fmt: skip
    with pytest.raises(ConfigError, match="different points"):
        flips(base, other)


def test_verdicts_between_deterministic_criteria_weigh_the_test_sets_noise(probes):
    """McNemar on the paired outcomes: 20 points apart, all one way, is beyond the test set's
    noise; a lead of one disagreeing point is within it, whatever the accuracies say."""
    from memprune.pruning import prune_verdicts

    _, base, served, idle = probes
    row = dict(params=1, params_ratio=0.5, macs=1, macs_ratio=0.5, std=0.0, seeds=1, steps=1)
    rows = [
        {**row, "strategy": "none", "ratio": 0.0, "recovery": "none", "accuracy": 1.0},
        {**row, "strategy": "a", "ratio": 0.5, "recovery": "none", "accuracy": 1.0},
        {**row, "strategy": "b", "ratio": 0.5, "recovery": "none", "accuracy": 0.8},
    ]
    outcomes = {("a", 0.5, 1, "none"): [idle], ("b", 0.5, 1, "none"): [served]}
    line = prune_verdicts(rows, outcomes=outcomes)[-1]
    assert "a wins" in line and "beyond the test set's noise (McNemar p = 1.91e-06" in line
    one = dataclasses.replace(served, predictions=base.predictions.clone())
    one.predictions[1] = 1 - one.predictions[1]  # wrong on one point only
    outcomes[("b", 0.5, 1, "none")] = [one]
    line = prune_verdicts(rows, outcomes=outcomes)[-1]
    assert "within the test set's noise (McNemar p = 1" in line
    assert "noise" not in prune_verdicts(rows)[-1]  # without outcomes: the seed spread only


def test_the_privacy_utility_front_keeps_the_undominated_rows(probes):
    """A row is on the front unless another has at least its accuracy, at most its canary
    AUC and at most its MACs, one strictly; each row averages its setting's encoders."""
    from memprune.pruning import privacy_rows

    _, base, _, _ = probes

    def result(auc, ssl):
        return dataclasses.replace(base, meta={"canary_auc": auc, "canary_gap": ssl})

    def row(strategy, ratio, acc, macs):
        return {"strategy": strategy, "ratio": ratio, "steps": 1 if ratio else 0,
                "recovery": "none", "accuracy": acc, "macs_ratio": macs}  # fmt: skip

    rows = [row("none", 0.0, 0.90, 1.0), row("a", 0.5, 0.80, 0.5), row("b", 0.5, 0.70, 0.5),
            row("c", 0.5, 0.85, 0.5)]  # fmt: skip
    groups = {("none", 0.0, 0, "none"): [result(0.9, 0.2)],
              ("a", 0.5, 1, "none"): [result(0.6, 0.1), result(0.8, 0.3)],  # mean 0.7
              ("b", 0.5, 1, "none"): [result(0.7, 0.1)],  # as private as a, less accurate
              ("c", 0.5, 1, "none"): [result(0.75, 0.1)]}  # fmt: skip
    table = {r["strategy"]: r for r in privacy_rows(rows, groups)}
    assert table["a"]["canary_auc"] == pytest.approx(0.7) and table["a"]["encoders"] == 2
    assert table["a"]["canary_gap"] == pytest.approx(0.2)
    assert {s for s, r in table.items() if r["front"]} == {"none", "a", "c"}
    assert table["a"]["canary_auc_se"] == pytest.approx(0.1)  # (0.8 - 0.6) / sqrt(2) / sqrt(2)
    assert "canary_auc_se" not in table["b"]  # one encoder: no spread


def _privacy_row(strategy, ratio, acc, macs, recovery="none", **signals):
    return {"strategy": strategy, "ratio": ratio, "steps": 1 if ratio else 0,
            "recovery": recovery, "accuracy": acc, "macs_ratio": macs, **signals}  # fmt: skip


def test_the_front_minimizes_the_candidates_memorization_beside_the_canaries():
    """With SSLMem against g recorded, the front also asks for at most the memorization: a
    row as accurate and as private on the canaries but holding more is dominated."""
    from memprune.pruning._forgetting import _dominates

    a = _privacy_row("a", 0.5, 0.8, 0.5, canary_auc=0.6, memorization=0.01)
    b = _privacy_row("b", 0.5, 0.8, 0.5, canary_auc=0.6, memorization=0.05)
    assert _dominates(a, b) and not _dominates(b, a)
    c = _privacy_row("c", 0.5, 0.8, 0.5, canary_auc=0.6)  # no memorization recorded
    assert not _dominates(a, c) and not _dominates(c, a)  # equal on what both hold


def test_privacy_verdicts_name_the_criterion_leaving_least_memorization_and_its_spread():
    from memprune.pruning import privacy_verdicts

    rows = [_privacy_row("none", 0.0, 0.90, 1.0, memorization=0.080,
                         memorization_point_se=0.012),
            _privacy_row("highest", 0.5, 0.70, 0.5, "distill", memorization=0.010,
                         memorization_se=0.002),
            _privacy_row("random", 0.5, 0.80, 0.5, "distill", memorization=0.030,
                         memorization_se=0.003),
            _privacy_row("lowest", 0.5, 0.75, 0.5, "distill", memorization=0.050,
                         memorization_se=0.004),
            _privacy_row("lowest", 0.3, 0.85, 0.7, memorization=0.060),
            _privacy_row("magnitude", 0.3, 0.84, 0.7, memorization=0.061)]  # fmt: skip
    first, *rest = privacy_verdicts(rows)
    assert first == (
        "candidates' SSLMem beyond unseen points: 0.080 unpruned ± 0.012"
        " (standard error over the scored points)"
    )
    at30 = next(line for line in rest if line.startswith("30%"))
    assert "lowest leaves the least" in at30 and "0.001 below magnitude" in at30
    assert "no seed spread, not judged" in at30 and "the most accurate too" in at30
    at50 = next(line for line in rest if line.startswith("50%"))
    assert "after distill: highest leaves the least" in at50 and "0.020 below random" in at50
    assert "beyond the seed spread (2 SE 0.007)" in at50  # 2 * sqrt(0.002² + 0.003²)
    assert "10.0 points below random's 80.0%" in at50
    rows[2]["memorization_se"] = 0.02  # a wide spread: the same lead is within it
    at50 = next(line for line in privacy_verdicts(rows) if line.startswith("50%"))
    assert "within the seed spread" in at50
    # two criteria that leave exactly the same (LAMP is magnitude within a layer): a tie,
    # and the lead is taken over the next criterion
    rows.append(_privacy_row("lamp", 0.5, 0.70, 0.5, "distill", memorization=0.010,
                             memorization_se=0.002))  # fmt: skip
    at50 = next(line for line in privacy_verdicts(rows) if line.startswith("50%"))
    assert "highest and lamp (equal) leave the least" in at50 and "below random" in at50


def test_privacy_verdicts_weigh_the_lead_against_the_scored_points_paired_noise():
    """Per-point SSLMem of each setting's encoders: a lead that every point shares is beyond
    the points' noise; the same mean lead made of large per-point swings is within it."""
    from types import SimpleNamespace

    from memprune.pruning import privacy_verdicts

    gen = torch.Generator().manual_seed(0)
    members, unseen = torch.rand(64, generator=gen), torch.rand(64, generator=gen)

    def result(shift, swing):
        wiggle = swing * torch.randn(64, generator=gen)
        wiggle -= wiggle.mean()  # the same mean lead, however large the swings
        return SimpleNamespace(meta={"sslmem_points": (members + shift + wiggle).tolist(),
                                     "sslmem_unseen_points": unseen.tolist()})  # fmt: skip

    def rows_and_groups(swing):
        a, b = [result(0.0, 0.0)], [result(0.02, swing)]
        lead = sum(b[0].meta["sslmem_points"]) / 64 - sum(a[0].meta["sslmem_points"]) / 64
        rows = [_privacy_row("a", 0.5, 0.8, 0.5, memorization=0.0),
                _privacy_row("b", 0.5, 0.8, 0.5, memorization=lead)]  # fmt: skip
        return rows, {("a", 0.5, 1, "none"): a, ("b", 0.5, 1, "none"): b}

    line = privacy_verdicts(*rows_and_groups(0.0))[-1]
    assert (
        "a leaves the least" in line
        and "beyond the scored points' noise (paired 2 SE 0.000)" in line
    )
    line = privacy_verdicts(*rows_and_groups(0.3))[-1]
    assert "within the scored points' noise" in line
    assert "points' noise" not in privacy_verdicts(rows_and_groups(0.0)[0])[-1]  # not recorded
