"""UnitMem as a torch-pruning importance, for a user's own pruning loop."""

from __future__ import annotations

import torch
import torch_pruning as tp

from memprune.errors import ConfigError, SiteError

#: A score strategy -> the sign of the scores in its importance (the least important units go
#: first): ``lowest`` removes the least memorizing units first, ``highest`` the most.
SCORE_SIGNS = {"lowest": 1.0, "highest": -1.0}


def channel_scores(n: int, contributions) -> tuple[torch.Tensor, torch.Tensor]:
    """The one mapping from site scores to channel importance, used by :func:`prune` and by
    :class:`UnitMemImportance`: for each of ``n`` channels of a group's root, the mean of the
    unit scores coupled to it, and how many there are. ``contributions`` yields
    ``(root channel indices [M], their units' scores [M])``, one per scored site."""
    total, count = torch.zeros(n), torch.zeros(n)
    for root, values in contributions:
        total.index_add_(0, root, values.float())
        count.index_add_(0, root, torch.ones(len(root)))
    return total / count.clamp(min=1), count


def site_sources(result) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Module name -> scored sites whose units are its output channels, and (attention heads)
    its input channels; from the site records of a :class:`~memprune.UnitMemResult`."""
    by_out: dict[str, list[str]] = {}
    by_in: dict[str, list[str]] = {}
    for name, info in result.meta.get("sites", {}).items():
        if not info.get("source"):
            raise ConfigError(
                f"the scores of site {name!r} do not record the module producing its units;"
                " recompute them with this version of memprune (memprune score units)"
            )
        (by_in if info["role"] == "heads" else by_out).setdefault(info["source"], []).append(name)
    return by_out, by_in


class UnitMemImportance(tp.importance.Importance):
    """A torch-pruning ``Importance`` from a :class:`~memprune.UnitMemResult`.

    For a dependency group it returns one value per channel of the group's root: the mean
    UnitMem of the scored units coupled to that channel (a conv's channel, its norm, and for
    residual stages every block's output channel; for attention, the heads' units entering
    ``attn.proj``, so torch-pruning's head pruning averages a head's own units). Groups with
    no scored unit return ``None`` (torch-pruning skips them); channels of a partly scored
    group that have no score get ``+inf`` (never pruned).

    ``strategy="lowest"`` makes the least memorizing units the least important (removed first);
    ``"highest"`` removes the most memorizing first. Works with ``tp.pruner.MetaPruner`` /
    ``BasePruner`` and ``global_pruning``; scores are in [0, 1] for every site, so one global
    ranking across layers is meaningful.

    Example::

        imp = memprune.UnitMemImportance(memprune.unit_mem(model, data), "lowest")
        pruner = tp.pruner.MetaPruner(model, example, imp, pruning_ratio=0.3,
                                      ignored_layers=[...])
        pruner.step()
    """

    def __init__(self, result, strategy: str = "lowest") -> None:
        if strategy not in SCORE_SIGNS:
            raise ConfigError(f"strategy must be one of {tuple(SCORE_SIGNS)}, got {strategy!r}")
        self.strategy = strategy
        self.scores = {k: v.float() for k, v in result.scores().items()}
        self._by_out, self._by_in = site_sources(result)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        graph = group._DG
        mean, count = channel_scores(len(group[0].idxs), self._contributions(graph, group))
        if not count.any():
            return None
        return (SCORE_SIGNS[self.strategy] * mean).masked_fill(count == 0, float("inf"))

    def _contributions(self, graph, group):
        """``(root channel indices, scores)`` of every scored site coupled to the group."""
        for item in group:
            dep = item.dep
            if graph.is_out_channel_pruning_fn(dep.handler):
                sites = self._by_out.get(dep.target._name, [])
            elif graph.is_in_channel_pruning_fn(dep.handler):
                sites = self._by_in.get(dep.target._name, [])
            else:
                continue
            for site in sites:
                score = self.scores[site]
                idxs = torch.as_tensor(item.idxs, dtype=torch.long)
                if len(idxs) and int(idxs.max()) >= len(score):
                    raise SiteError(
                        f"{dep.target._name} has more channels than site {site!r} has scores"
                        f" ({len(score)}): the scores come from a different (or already pruned)"
                        " model; recompute them on this one"
                    )
                yield torch.as_tensor(item.root_idxs, dtype=torch.long), score[idxs]
