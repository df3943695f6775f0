"""The papers' claims checked on a run: constructed results with known verdicts."""

import torch

from memprune.recipes._findings import (
    FAILS,
    HOLDS,
    SKIPPED,
    UNSURE,
    cka_depth,
    combine,
    findings_lines,
    finetune_top,
    judge,
    layermem_depth,
    mlp_vs_attention,
    pruning_highest,
    top_vs_least,
    units_vs_classes,
)
from memprune.scores import ClassMemResult, LayerMemResult, UnitMemResult

LAYERS = ["l1", "l2", "l3", "l4", "output"]


def test_judge_and_combine():
    assert judge(0.3, 0.1) == HOLDS and judge(-0.3, 0.1) == FAILS and judge(0.1, 0.1) == UNSURE
    assert judge(1.0, None) == UNSURE  # no spread: nothing to judge by
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([HOLDS, UNSURE]) == UNSURE
    assert combine([HOLDS, FAILS, UNSURE]) == FAILS and combine([]) == UNSURE


def _layermem(run, gaps: list[float], n=200, noise=0.01, seed=0):
    """A LayerMem result whose per-point SSLMem at layer j is gaps[j] + noise (loss_f = 1,
    loss_g = (1 + s) / (1 - s) gives (g - f) / (g + f) = s exactly)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(gaps).repeat(n, 1) + noise * torch.randn(n, len(gaps), generator=g)
    s = torch.cat([s, s[:, -1:]], 1)  # the output repeats the last layer
    loss_f = torch.ones_like(s)
    result = LayerMemResult(LAYERS, torch.arange(n), loss_f, (1 + s) / (1 - s))
    result.save(run / "layermem" / "layermem")
    return result


def test_layermem_depth_on_planted_profiles(tmp_path):
    # rises overall, drops after l2, largest Δ at l2: every part holds
    _layermem(tmp_path / "a", [0.0, 0.2, 0.1, 0.12])
    assert layermem_depth(tmp_path / "a", {}).verdict == HOLDS
    # monotonic rise with the largest step last: the claim fails
    _layermem(tmp_path / "b", [0.0, 0.05, 0.1, 0.3])
    found = layermem_depth(tmp_path / "b", {})
    assert found.verdict == FAILS and "largest ΔLayerMem at l4" in found.figure
    # noise far above the profile: inconclusive
    _layermem(tmp_path / "c", [0.0, 0.002, 0.001, 0.003], n=20, noise=0.2)
    assert layermem_depth(tmp_path / "c", {}).verdict != HOLDS
    assert layermem_depth(tmp_path / "none", {}).verdict == SKIPPED


def test_top_points_against_least_points(tmp_path):
    # per-point memorization that persists through every layer: top > least everywhere
    n = 200
    g = torch.Generator().manual_seed(1)
    level = torch.rand(n, 1, generator=g) * 0.3
    s = level + 0.01 * torch.randn(n, 4, generator=g)
    s = torch.cat([s, s[:, -1:]], 1)
    LayerMemResult(LAYERS, torch.arange(n), torch.ones_like(s), (1 + s) / (1 - s)).save(
        tmp_path / "layermem" / "layermem"
    )
    assert top_vs_least(tmp_path, {}).verdict == HOLDS
    # the ranking lives in the last layer only: the earlier layers do not follow it
    _layermem(tmp_path / "flat", [0.1, 0.1, 0.1, 0.1])
    assert top_vs_least(tmp_path / "flat", {}).verdict != HOLDS


def _unit_scores(cls, scores: dict, roles=None):
    sites = {
        name: {"score": v, "argmax": torch.zeros(len(v), dtype=torch.long), "mu_max": v.clone(),
               "mu_rest": v.clone(), "dead": torch.zeros(len(v), dtype=torch.bool)}
        for name, v in scores.items()
    }  # fmt: skip
    meta = {"sites": {name: {"role": (roles or {}).get(name, "conv")} for name in scores}}
    return cls(sites, meta)


def test_units_against_classes(tmp_path):
    high, low = torch.full((50,), 0.6), torch.full((50,), 0.2)
    high = high + 0.01 * torch.randn(50, generator=torch.Generator().manual_seed(0))
    (tmp_path / "classmem").mkdir()
    _unit_scores(UnitMemResult, {"a": high}).save(tmp_path / "unitmem" / "unitmem")
    _unit_scores(ClassMemResult, {"a": low}).save(tmp_path / "classmem" / "classmem_f")
    # supervised: classes above units, as the papers report
    _unit_scores(UnitMemResult, {"a": low}).save(tmp_path / "classmem" / "unitmem_supervised")
    _unit_scores(ClassMemResult, {"a": high}).save(tmp_path / "classmem" / "classmem_supervised")
    assert units_vs_classes(tmp_path, {}).verdict == HOLDS
    # supervised units also memorize points: the second half fails
    _unit_scores(UnitMemResult, {"a": high}).save(tmp_path / "classmem" / "unitmem_supervised")
    _unit_scores(ClassMemResult, {"a": low}).save(tmp_path / "classmem" / "classmem_supervised")
    assert units_vs_classes(tmp_path, {}).verdict == FAILS


def test_mlp_against_attention(tmp_path):
    g = torch.Generator().manual_seed(0)
    scores, roles = {}, {}
    for b in range(6):
        scores[f"blocks.{b}.attn.qkv"] = 0.3 + 0.01 * torch.randn(8, generator=g)
        scores[f"blocks.{b}.mlp.act"] = 0.5 + 0.01 * torch.randn(8, generator=g)
        roles[f"blocks.{b}.attn.qkv"], roles[f"blocks.{b}.mlp.act"] = "attn", "mlp"
    _unit_scores(UnitMemResult, scores, roles).save(tmp_path / "unitmem" / "unitmem")
    found = mlp_vs_attention(tmp_path, {})
    assert found.verdict == HOLDS and "over 6 blocks (MLP higher in 6)" in found.figure
    _unit_scores(UnitMemResult, {"conv1": torch.rand(8)}).save(
        tmp_path / "cnn" / "unitmem" / "unitmem"
    )
    assert mlp_vs_attention(tmp_path / "cnn", {}).verdict == SKIPPED


def _prune_row(strategy, ratio, accuracy, std=0.0, seeds=1):
    return {"strategy": strategy, "ratio": ratio, "steps": 1, "recovery": "none",
            "accuracy": accuracy, "std": std, "seeds": seeds}  # fmt: skip


def test_pruning_and_finetuning_claims_use_the_seed_spread():
    rows = [_prune_row("highest", 0.5, 0.40, 0.01, 3), _prune_row("lowest", 0.5, 0.80, 0.01, 3),
            _prune_row("random", 0.5, 0.60, 0.02, 3)]  # fmt: skip
    assert pruning_highest(None, {"prune": {"rows": rows}}).verdict == HOLDS
    rows[2] = _prune_row("random", 0.5, 0.41, 0.05, 3)  # within the spread
    assert pruning_highest(None, {"prune": {"rows": rows}}).verdict == UNSURE
    one_seed = [_prune_row("highest", 0.5, 0.4), _prune_row("lowest", 0.5, 0.8)]
    found = pruning_highest(None, {"prune": {"rows": one_seed}})
    assert found.verdict == UNSURE and "no spread" in found.figure

    def ft(strategy, k, mean, std=0.01, seeds=3):
        return {"strategy": strategy, "k": k, "mean": mean, "std": std, "seeds": seeds}

    won = [
        ft("top delta", 1, 0.9),
        ft("last", 1, 0.8),
        ft("top delta", 2, 0.92),
        ft("last", 2, 0.9),
    ]
    assert finetune_top(None, {"finetune": {"rows": won}}).verdict == HOLDS
    lost = [ft("top delta", 1, 0.7), ft("last", 1, 0.8)]
    assert finetune_top(None, {"finetune": {"rows": lost}}).verdict == FAILS
    assert finetune_top(None, {}).verdict == SKIPPED


def test_cka_claim_from_disjoint_minibatches():
    layers = {"l1": 0.9, "l2": 0.7, "l3": 0.4}
    falls = [[0.91, 0.70, 0.42], [0.88, 0.69, 0.38], [0.92, 0.72, 0.41]]
    found = cka_depth(None, {"cka": {"cka": layers, "folds": falls, "minibatch": 64}})
    assert found.verdict == HOLDS and "first − last layer +0.500" in found.figure
    rises = [row[::-1] for row in falls]
    assert (
        cka_depth(None, {"cka": {"cka": layers, "folds": rises, "minibatch": 64}}).verdict == FAILS
    )
    noisy = [[0.9, 0.5, 0.4], [0.1, 0.5, 0.9]]  # first − last: +0.5 and −0.8
    assert (
        cka_depth(None, {"cka": {"cka": layers, "folds": noisy, "minibatch": 64}}).verdict == UNSURE
    )
    assert cka_depth(None, {}).verdict == SKIPPED


def test_the_section_names_every_claim_and_what_was_skipped(tmp_path):
    _layermem(tmp_path, [0.0, 0.2, 0.1, 0.12])
    lines = findings_lines(tmp_path, {})
    claims = [line for line in lines if line.startswith("- **")]
    assert len(claims) == 11
    assert sum(f"**{SKIPPED}**" in line for line in claims) == 9  # only LayerMem is here
    assert "9 claims were not evaluated" in lines[-1]


def test_the_forgetting_claim_is_judged_per_criterion_against_chance():
    from memprune.recipes._findings import FAILS, HOLDS, UNSURE, pruning_forgets_atypical

    def verdict(*rows):
        return pruning_forgets_atypical(None, {"prune": {"forgetting": list(rows)}}).verdict

    atypical = {"strategy": "lowest", "auc": 0.70, "auc_se": 0.05, "n": 4, "forgotten": 9}
    typical = {"strategy": "random", "auc": 0.35, "auc_se": 0.05, "n": 4, "forgotten": 9}
    noisy = {"strategy": "magnitude", "auc": 0.55, "auc_se": 0.05, "n": 4, "forgotten": 9}
    one = {"strategy": "fpgm", "auc": 0.9, "auc_se": None, "n": 1, "forgotten": 2}
    none = {"strategy": "bnscale", "auc": None, "auc_se": None, "n": 0, "forgotten": 0}
    assert verdict(atypical) == HOLDS and verdict(atypical, typical) == FAILS
    assert verdict(atypical, noisy) == UNSURE and verdict(one) == UNSURE
    assert verdict(none) == UNSURE
    assert pruning_forgets_atypical(None, {"prune": {"rows": []}}).verdict == SKIPPED


def test_the_canary_claims_are_judged_on_the_stages_numbers():
    from memprune.recipes._findings import canaries_ablation, canaries_atypical

    def metrics(**kw):
        base = dict(atypical_diff=0.1, atypical_se=0.02, canary_drop=0.05, random_drop=0.01,
                    random_drop_se=0.01, sslmem_diff=0.15, typical_diff=0.05,
                    raw_atypical_diff=-0.1)  # fmt: skip
        return {"canaries": {**base, **kw}}

    assert canaries_atypical(None, metrics()).verdict == HOLDS
    assert canaries_atypical(None, metrics(atypical_diff=-0.1)).verdict == FAILS
    assert canaries_atypical(None, metrics(atypical_diff=0.01)).verdict == UNSURE
    assert canaries_ablation(None, metrics()).verdict == HOLDS  # 0.04 > 2 x 0.01
    assert canaries_ablation(None, metrics(canary_drop=0.0)).verdict == UNSURE
    assert canaries_ablation(None, metrics(canary_drop=-0.05)).verdict == FAILS
    assert canaries_atypical(None, {}).verdict == SKIPPED


def test_the_atypical_claim_contrasts_membership_effects_not_raw_scores():
    """A canary kind that both encoders score low (excluded canaries at -0.2) but whose
    membership adds more than the typical points' does is memorized more: the contrast is
    (included - excluded) - (candidates - extras), with the SEs added in quadrature."""
    import math
    from types import SimpleNamespace

    from memprune.recipes.stages.canaries import _membership_contrast
    from memprune.scores.canaries import difference

    g = torch.Generator().manual_seed(0)

    def around(mean, n):
        return mean + 0.01 * torch.randn(n, generator=g)

    inc, exc, cand, extra = around(-0.05, 30), around(-0.2, 30), around(0.1, 50), around(0.05, 50)
    audit = SimpleNamespace(sslmem_included=inc, sslmem_difference=lambda: difference(inc, exc))
    c = _membership_contrast(audit, cand, extra)
    expected = float((inc.mean() - exc.mean()) - (cand.mean() - extra.mean()))
    assert abs(c["atypical_diff"] - expected) < 1e-6 and c["atypical_diff"] > 0.09
    assert c["raw_atypical_diff"] < -0.1  # without the control the canaries look less memorized
    se = math.hypot(difference(inc, exc)[1], difference(cand, extra)[1])
    assert abs(c["atypical_se"] - se) < 1e-9
