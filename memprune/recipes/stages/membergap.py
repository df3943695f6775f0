"""``membergap``: the member gap and membership AUC per layer of f alone (its training points
against points it never saw): the reference-free layer ranking (docs/method.md §7)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memprune.recipes._stages import Stage, StageResult


@dataclass
class MemberGapSummary(StageResult):
    top_gap_layer: str
    top_gap: float
    output_gap: float
    output_gap_lo: float
    output_gap_hi: float
    output_auc: float
    n_members: int
    n_nonmembers: int


def run(ctx, out: Path) -> MemberGapSummary:
    from memprune._table import write_table
    from memprune.report import plot_member_gap
    from memprune.scores import member_gap

    r, c = ctx.recipe, ctx.recipe.scores.membergap
    result = member_gap(
        ctx.encoder("f"), ctx.points("members"), ctx.points("nonmembers"), n_pairs=c.pairs,
        layers=c.layers, representation=c.representation, pair=c.pair, n_points=c.n_points,
        n_boot=c.n_boot, chunk_size=r.scores.chunk_size, seed=r.seed, device=r.device,
        num_workers=r.workers, augment=r.scores.augment, precision=r.precision,
    )  # fmt: skip
    result.meta.update(encoder=ctx.checkpoint("f"), data=r.data.name)
    result.save(out / "membergap")
    plot_member_gap(result, out / "membergap.png")
    rows = result.to_rows()
    write_table(out / "membergap", rows)
    layers = [row for row in rows if row["layer"] != "output"]
    top = max(layers, key=lambda row: row["gap"])
    return MemberGapSummary(
        top_gap_layer=top["layer"], top_gap=top["gap"], output_gap=rows[-1]["gap"],
        output_gap_lo=rows[-1]["gap_lo"], output_gap_hi=rows[-1]["gap_hi"],
        output_auc=rows[-1]["auc"], n_members=len(result.member_indices),
        n_nonmembers=len(result.nonmember_indices),
    )  # fmt: skip


def headlines(g: MemberGapSummary) -> list[str]:
    verdict = (
        "f tells its training points from unseen ones at the output"
        if g.output_gap_lo > 0 else "no member gap at the output beyond the interval"
    )  # fmt: skip
    return [
        f"Member gap (f alone, {g.n_members} members vs {g.n_nonmembers} non-members):"
        f" {g.output_gap:+.4f} at the output (95% interval {g.output_gap_lo:+.4f} to"
        f" {g.output_gap_hi:+.4f}, AUC {g.output_auc:.3f}); largest at {g.top_gap_layer}"
        f" ({g.top_gap:+.4f}): {verdict}."
    ]


STAGE = Stage(
    "membergap",
    MemberGapSummary,
    run,
    enabled=lambda recipe: recipe.scores.membergap.enabled,
    headlines=headlines,
    values=lambda g: {"member gap at the output": g.output_gap},
    tables=(("membergap.md", "Member gap per layer (reference-free)"),),
    plots=(("membergap.png", "member gap and membership AUC per layer (f alone)"),),
    printed="membergap.md",
)
