"""Plots, written atomically as PNG with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from memprune._io import atomic_write


def save_figure(fig, path: str | os.PathLike) -> Path:
    try:
        return atomic_write(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        )
    finally:
        plt.close(fig)


def plot_unit_scores(result, path: str | os.PathLike, title: str | None = None) -> Path:
    """Per-site distributions of unit scores (box plots, forward order) with per-site means."""
    names = list(result.sites)
    data = [result.sites[n]["score"].numpy() for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
    ax.plot(
        range(1, len(names) + 1),
        [d.mean() for d in data],
        "o-",
        color="tab:red",
        ms=3,
        label="mean",
    )
    ax.set_xticks(range(1, len(names) + 1), names, rotation=70, ha="right", fontsize=7)
    label = {"unitmem": "UnitMem", "classmem": "ClassMem"}.get(result.kind, result.kind)
    ax.set_ylabel(label)
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.legend(loc="upper left", fontsize=8)
    meta = result.meta
    ax.set_title(
        title
        or f"{label} per site: {meta.get('model')} on {meta.get('data')}"
        f" ({meta.get('n_points')} points, {meta.get('n_views')} views)",
        fontsize=9,
    )
    return save_figure(fig, path)
