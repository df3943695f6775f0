"""Structured pruning of units ranked by UnitMem, random or magnitude (docs/method.md §9)."""

from __future__ import annotations

import copy
import math
import warnings
import zlib
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from memprune.encoders import evaluating, input_size
from memprune.errors import ConfigError, SiteError, first_line
from memprune.pruning._glu import glu_weights
from memprune.pruning._groups import (
    CONV_GROUPS,
    HEADS,
    KINDS,
    UNITS,
    Group,
    build_groups,
    dependency_graph,
    grouped_convs,
    out_fn,
    prune_group,
)
from memprune.pruning._heads import clear_caches, head_weights
from memprune.pruning._importance import SCORE_SIGNS
from memprune.registry import Registry
from memprune.results import Result
from memprune.sites import Site, find_sites


@dataclass
class PruneResult(Result):
    """What one pruning run removed and what it bought.

    ``params`` / ``macs`` / ``latency_s`` are ``(before, after)``: parameters and MACs counted by
    torch-pruning (modules only: a ViT's attention matrix products are not counted), latency
    the median seconds of one forward pass of ``batch_size`` images on ``device``
    (``torch.utils.benchmark``; None when not measured). ``groups`` has one entry per group of
    coupled units: ``name``, ``kind`` (units / heads), ``sites``, ``before``, ``after``,
    ``removed`` (original unit indices), ``output`` (reaches the output width), ``pruned`` and
    ``blocked`` (why it was left alone). ``kind`` is ``units``, ``heads`` or ``convgroups``
    (a grouped convolution's groups: ``before`` / ``after`` count groups).
    """

    kind = "prune"
    strategy: str
    ratio: float
    scope: str
    steps: int
    params: tuple[int, int]
    macs: tuple[float, float]
    latency_s: tuple[float, float] | None
    batch_size: int | None
    device: str
    groups: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def widths(self) -> dict[str, tuple[int, int]]:
        """Site name -> (units before, units after); heads sites count heads."""
        return {s: (g["before"], g["after"]) for g in self.groups for s in g["sites"]}

    def row(self) -> dict:
        """One table row: the strategy, ratio, and the after / before ratios."""
        row = {
            "strategy": self.strategy,
            "ratio": self.ratio,
            "params": self.params[1],
            "params_ratio": self.params[1] / self.params[0],
            "macs": round(self.macs[1]),
            "macs_ratio": self.macs[1] / self.macs[0],
        }
        if self.latency_s is not None:
            row["latency_ms"] = 1e3 * self.latency_s[1]
            row["latency_ratio"] = self.latency_s[1] / self.latency_s[0]
        return row

    def to_rows(self) -> list[dict]:
        """One row per group of coupled units: its width before and after."""
        return [{"group": g["name"], "kind": g["kind"], "before": g["before"],
                 "after": g["after"], "pruned": g["pruned"]} for g in self.groups]  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    def _fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "meta"}

    @classmethod
    def _build(cls, tensors, fields, meta):
        if "iterative_steps" in fields:  # written before the rename
            fields = {**fields, "steps": fields.pop("iterative_steps")}
        pairs = {k: tuple(fields[k]) if fields[k] is not None else None
                 for k in ("params", "macs", "latency_s")}  # fmt: skip
        return cls(**{**fields, **pairs}, meta=meta)


def _quiet_cpp_extension() -> None:
    """torch's C++ extension module logs "No CUDA runtime is found" when it is imported on a
    machine without a GPU: nothing about the user's input, so it is silenced."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def measure_latency(model: nn.Module, batch: torch.Tensor, min_run_time: float = 0.5) -> float:
    """Median seconds of ``model(batch)`` in eval mode (``torch.utils.benchmark``, which warms
    up, synchronizes CUDA and uses all of torch's threads here)."""
    _quiet_cpp_extension()
    from torch.utils import benchmark  # imported late: it loads torch's C++ extension tools

    # an exported program runs as exported (eval mode) and refuses .eval()
    mode = nullcontext() if isinstance(model, torch.fx.GraphModule) else evaluating(model)
    with mode, torch.inference_mode():
        model(batch)
        timer = benchmark.Timer(
            "model(x)", globals={"model": model, "x": batch}, num_threads=torch.get_num_threads()
        )
        return timer.blocked_autorange(min_run_time=min_run_time).median


def _measure(model: nn.Module, example: torch.Tensor, batch_size: int | None, min_run_time: float):
    with evaluating(model):
        macs, params = tp.utils.count_ops_and_params(model, example)
    latency = None
    if batch_size:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, *example.shape[1:], generator=g).to(example.device)
        latency = measure_latency(model, x, min_run_time)
    return int(params), float(macs), latency


def check_options(
    ratio: float,
    strategy: str,
    scope: str = "layer",
    max_layer_ratio: float | None = None,
    steps: int = 1,
    scores=None,
    rescore=None,
    gradients=None,
    between_steps=None,
) -> None:
    """Refuse bad pruning options with a message naming the value and the valid ones (the
    checks :func:`prune` runs first; call it to validate a whole sweep before any work)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(
            f"ratio must be a fraction in [0, 1) of the units to remove, got {ratio!r}"
        )
    needs = PRUNING_STRATEGIES[strategy].needs
    SCOPES.check(scope)
    if max_layer_ratio is not None and not 0 < max_layer_ratio <= 1:
        raise ConfigError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if needs == "scores" and scores is None:
        raise ConfigError(
            f"strategy {strategy!r} ranks units by their scores: pass scores=memprune.unit_mem("
            "encoder, data) (or a saved UnitMemResult)"
        )
    if rescore is not None and not callable(rescore):
        raise ConfigError("rescore must be a callable model -> UnitMemResult")
    if between_steps is not None and not callable(between_steps):
        raise ConfigError("between_steps must be a callable model -> None (e.g. a recovery)")
    if needs == "gradients" and not callable(gradients):
        what = ("their mean activation on data (the forward passes of a loss)"
                if strategy == "activation" else "the gradient of a loss")  # fmt: skip
        raise ConfigError(
            f"strategy {strategy!r} ranks units by {what}: pass gradients="
            "memprune.pruning.ssl_gradient_fn(data) (no labels) or head_gradient_fn(data)"
        )


def _architecture(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)


def check_unit_scores(scores, model: nn.Module) -> None:
    """Refuse scores that do not belong to ``model`` or are not UnitMem: another kind of
    result, scores recorded on other weights (another init, a checkpoint overwritten since),
    and values UnitMem cannot take (NaN or infinite; outside [0, 1] where :func:`unit_mem`
    made them with bounded activations, ``signed`` other than ``"raw"``: an edited file).
    Scores built by hand without that record (a planted ranking) are checked for finiteness
    only."""
    from memprune.encoders import weights_hash

    kind = getattr(scores, "kind", None)
    if kind != "unitmem":
        raise ConfigError(
            f"lowest / highest prune by UnitMem, but the scores are a"
            f" {kind or type(scores).__name__} result: pass the UnitMem of the encoder"
            " (memprune score units, memprune.unit_mem)"
        )
    meta = getattr(scores, "meta", None) or {}
    made_on = meta.get("weights")
    if made_on is not None and made_on != weights_hash(model)[: len(made_on)]:
        raise ConfigError(
            f"the UnitMem scores were computed on an encoder with other weights (weights"
            f" {made_on}, this one {weights_hash(model)[: len(made_on)]}): another init or a"
            " checkpoint changed since; score the encoder you prune"
        )
    bounded = "signed" in meta and meta["signed"] != "raw"  # made by unit_mem, bounded
    for name, fields in scores.sites.items():
        values = torch.as_tensor(fields["score"], dtype=torch.float64)
        bad = ~torch.isfinite(values)
        if bad.any():
            raise ConfigError(
                f"site {name!r} has {int(bad.sum())} non-finite UnitMem scores (NaN or inf):"
                " these scores are damaged; score the encoder again"
            )
        if bounded and values.numel() and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
            raise ConfigError(
                f"site {name!r} has UnitMem scores outside [0, 1] (min {float(values.min()):.4g},"
                f" max {float(values.max()):.4g}): not UnitMem of non-negative activations;"
                " score the encoder again"
            )


def prune_sites(model: nn.Module, scores, size: tuple[int, ...]) -> list[Site]:
    """The unit sites to prune: those of ``scores`` (checked against ``model``), or all."""
    auto = {s.name: s for s in find_sites(model, "units", input_size=size)}
    if scores is None:
        return list(auto.values())
    check_unit_scores(scores, model)
    made_on = scores.meta.get("model")
    if made_on and made_on != _architecture(model):
        raise SiteError(
            f"the scores were computed on a {made_on!r} encoder, this one is"
            f" {_architecture(model)!r}: compute scores on the encoder you prune"
        )
    modules = dict(model.named_modules())
    missing = [n for n in scores.sites if n not in auto and n not in modules]
    if missing:
        raise SiteError(
            f"the scores name sites missing from this {_architecture(model)} encoder:"
            f" {', '.join(missing[:8])}; compute scores on the encoder you prune"
        )
    sites = []
    for name, fields in scores.sites.items():
        site = auto.get(name) or find_sites(model, "units", include=name, input_size=size)[0]
        if len(fields["score"]) != site.n_units:
            raise SiteError(
                f"site {name!r} has {site.n_units} units in this encoder but"
                f" {len(fields['score'])} scores: the scores come from a different (or already"
                " pruned) model; compute them on the encoder you prune"
            )
        sites.append(site)
    return sites


@dataclass
class _State:
    """What one :func:`prune` call tracks across its steps, per group (by name): its initial
    width and :class:`Group`, the original index of each unit still there (``origin``), the
    original indices removed so far, and (score strategies) the initial per-unit scores."""

    scores: object
    rescore: Callable | None
    seed: int
    step: int = 0
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, torch.Tensor] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    initial: dict[str, int] = field(default_factory=dict)
    info: dict[str, Group] = field(default_factory=dict)


def _seed(seed: int, step: int, name: str) -> int:
    return (seed * 1_000_003 + step * 10_007 + zlib.crc32(name.encode())) % (2**63)


def _group_importance(name: str, make: Callable[[], tp.importance.Importance]):
    """A strategy from a torch-pruning ``Importance``, computed over each unit's whole
    dependency group (every coupled conv, norm and linear) and averaged over a head's
    channels."""

    def side(graph, model, group: Group, root_name: str, dim: int) -> torch.Tensor:
        root = dict(model.named_modules())[root_name]
        fn = out_fn(graph, root)
        imp = make()(graph.get_pruning_group(root, fn, list(range(group.width * dim))))
        if imp is None:
            raise ConfigError(
                f"strategy {name!r} finds nothing to score in group {group.name} (network"
                " slimming needs a BatchNorm after each pruned conv; ViTs have none): use"
                " magnitude or lamp for this encoder"
            )
        return imp.float().cpu()

    def importance(graph, model, group: Group, state: _State) -> torch.Tensor:
        if group.kind == HEADS or group.glu:  # units inside one module
            return _inside_criterion(name, model, group)
        imp = side(graph, model, group, group.root, group.head_dim)
        if group.kind == CONV_GROUPS:  # both sides of each conv group
            return group.merge(imp, side(graph, model, group, group.partner, group.partner_dim))
        return imp.view(group.width, group.head_dim).mean(dim=1)

    return importance


#: A criterion over a unit's own weights ``w`` and gradients ``g`` (summed over them).
_INSIDE_CRITERIA = {
    "magnitude": lambda w, g: w.pow(2).sum(),  # square-rooted after the sum: an L2 norm
    "taylor": lambda w, g: (w * g).abs().sum(),
    "hessian": lambda w, g: (w.pow(2) * g).sum(),  # g holds the mean squared gradient
}


def _inside_criterion(name: str, model, group: Group) -> torch.Tensor:
    """Per unit of a group that lives inside one module (an attention's heads, a gated
    MLP's units): ``magnitude`` (L2 norm), ``taylor`` or ``hessian`` over the unit's own
    weights (a head's query / key / value rows and ``proj`` columns; a gated unit's two
    ``fc1`` rows and ``fc2`` column), divided by their mean over the group (torch-pruning's
    default normalization, so ``global`` compares groups on one scale)."""
    if name not in _INSIDE_CRITERIA:
        raise ConfigError(
            f"strategy {name!r} does not score {'gated-MLP' if group.glu else group.kind}"
            f" units of {group.name}: use {', '.join(sorted(_INSIDE_CRITERIA))}, random or a"
            " UnitMem strategy"
        )
    modules = dict(model.named_modules())
    if group.glu:
        mlp = modules[group.glu]
        slices = [glu_weights(mlp, u) for u in range(group.width)]
    else:
        attn = modules[group.name]
        slices = [head_weights(attn, h, group.layout) for h in range(group.width)]
    fn = _INSIDE_CRITERIA[name]
    if name != "magnitude" and any(g is None for parts in slices for _, g in parts):
        raise ConfigError(f"strategy {name!r}: {group.name} got no gradient from gradients(model)")
    with torch.no_grad():
        imp = torch.stack([sum(fn(w.float(), None if g is None else g.float()) for w, g in parts)
                           for parts in slices]).cpu()  # fmt: skip
    imp = imp.sqrt() if name == "magnitude" else imp
    return imp / imp.mean().clamp_min(1e-12)


def _by_score(sign: float):
    def importance(graph, model, group, state: _State) -> torch.Tensor:
        if state.step > 1 and state.rescore is not None:  # fresh scores of the pruned model
            return sign * group.unit_scores(state.scores.scores())
        return sign * state.base[group.name][state.origin[group.name]]  # initial scores

    return importance


def _random(graph, model, group, state: _State) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(state.seed, state.step, group.name))
    return torch.rand(group.width, generator=gen)


@dataclass(frozen=True)
class Strategy:
    """A pruning strategy: ``importance(graph, model, group, state)`` per unit of a group (the
    lowest go first), and what it needs from the caller of :func:`prune`: ``scores`` (a
    UnitMem result), ``gradients`` (the gradient of a loss) or nothing."""

    importance: Callable
    needs: Literal["scores", "gradients"] | None = None


def _criterion(name: str, make, needs: str | None = None) -> Strategy:
    return Strategy(_group_importance(name, make), needs)


#: ``strategy`` -> :class:`Strategy`.
PRUNING_STRATEGIES = Registry(
    "pruning strategy",
    {"lowest": Strategy(_by_score(SCORE_SIGNS["lowest"]), "scores"),
     "highest": Strategy(_by_score(SCORE_SIGNS["highest"]), "scores"),
     "random": Strategy(_random),
     # torch-pruning's criteria: L2 norm of the group's weights; LAMP (Lee et al. 2021), the
     # magnitude normalized by the norms of the larger weights of its layer; network slimming
     # (Liu et al. 2017), the |scale| of the BatchNorm that follows each conv
     "magnitude": _criterion("magnitude", lambda: tp.importance.GroupMagnitudeImportance(p=2)),
     "lamp": _criterion("lamp", lambda: tp.importance.LAMPImportance(p=2)),
     "bnscale": _criterion("bnscale", tp.importance.BNScaleImportance),
     # first-order Taylor (Molchanov et al. 2019): |weight x gradient| of a loss, from the
     # ``gradients`` callable (memprune.pruning.ssl_gradient_fn / head_gradient_fn)
     "taylor": _criterion("taylor", tp.importance.GroupTaylorImportance, "gradients"),
     # Optimal Brain Damage (LeCun et al. 1990): weight^2 x the Hessian's diagonal, estimated
     # by the mean squared gradient of the loss's batches (an empirical Fisher)
     "hessian": _criterion("hessian", tp.importance.GroupHessianImportance, "gradients"),
     # forward-only and data-driven, the field's criteria closest to UnitMem: the mean
     # |activation| of a unit into the layers that read it, over every batch that
     # ``gradients`` runs (its forward passes; the gradient is not used), and FPGM (He et al.
     # 2019), the filters nearest the geometric median of their layer's go first
     "activation": _criterion("activation", lambda: _AccumulatedActivation(), "gradients"),
     "fpgm": _criterion("fpgm", tp.importance.FPGMImportance)},
)  # fmt: skip
#: The strategies compared when none are named: UnitMem both ways against the baselines.
DEFAULT_STRATEGIES = ("lowest", "highest", "random", "magnitude")
#: ``scope``: the ratio in every group, or one ranking over all groups.
SCOPES = Registry("pruning scope", {"layer": "per group", "global": "over all groups"})


def _plan(groups, imps, fraction, scope, max_layer_ratio, initial) -> dict[str, torch.Tensor]:
    """Current unit indices to remove from each group so that ``fraction`` of the initial
    units are gone (per group, or over all groups of a kind for ``global``); a group always
    keeps one unit."""
    plan = {g.name: torch.zeros(0, dtype=torch.long) for g in groups}
    gone = {g.name: initial[g.name] - g.width for g in groups}
    if scope == "layer":
        for g in groups:
            n = min(math.floor(fraction * initial[g.name] + 1e-9) - gone[g.name], g.width - 1)
            plan[g.name] = torch.sort(imps[g.name], stable=True).indices[: max(n, 0)]
        return plan
    for kind in KINDS:
        pool = [g for g in groups if g.kind == kind]
        if not pool:
            continue
        total = sum(initial[g.name] for g in pool)
        want = math.floor(fraction * total + 1e-9) - sum(gone[g.name] for g in pool)
        cap = {
            g.name: min(
                math.floor((max_layer_ratio or 1.0) * initial[g.name] + 1e-9) - gone[g.name],
                g.width - 1,
            )
            for g in pool
        }
        imp = torch.cat([imps[g.name] for g in pool])
        owner = torch.cat([torch.full((g.width,), i) for i, g in enumerate(pool)])
        unit = torch.cat([torch.arange(g.width) for g in pool])
        chosen = {g.name: [] for g in pool}
        picked = 0
        for j in torch.sort(imp, stable=True).indices.tolist():
            if picked >= want:
                break
            g = pool[int(owner[j])]
            if len(chosen[g.name]) < cap[g.name]:
                chosen[g.name].append(int(unit[j]))
                picked += 1
        if picked < want:
            warnings.warn(
                f"global pruning removed {picked} of the {want} {kind} asked for: the per-layer"
                f" cap (max_layer_ratio={max_layer_ratio}, one unit kept) binds; raise it",
                UserWarning,
                stacklevel=3,
            )
        plan.update({name: torch.tensor(idx, dtype=torch.long) for name, idx in chosen.items()})
    return plan


def prune(
    encoder: nn.Module,
    scores=None,
    ratio: float = 0.2,
    strategy: str = "lowest",
    scope: str = "layer",
    max_layer_ratio: float | None = None,
    keep_output_width: bool = True,
    heads: bool = False,
    steps: int = 1,
    rescore: Callable[[nn.Module], object] | None = None,
    example_input: torch.Tensor | None = None,
    seed: int = 0,
    latency_batch: int | None = 64,
    latency_time: float = 0.5,
    inplace: bool = False,
    baseline_latency_s: float | None = None,
    gradients: Callable[[nn.Module], object] | None = None,
    between_steps: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, PruneResult]:
    """Remove ``ratio`` of the units of ``encoder`` for real (docs/method.md §9).

    Units are the output channels producing each unit site (conv + norm + the next layer's
    input; a ViT MLP's hidden neurons), removed through torch-pruning's dependency graph so
    shapes, parameters and MACs shrink. Sites whose channels are coupled (a residual stage)
    are one group, scored by the mean of their units' scores.

    Args:
        encoder: a timm CNN or ViT (not modified unless ``inplace``).
        scores: a :class:`~memprune.UnitMemResult` of this encoder; its sites are the ones
            pruned (all unit sites when None: only for ``random`` / ``magnitude``).
        ratio: fraction in [0, 1) of each group's units to remove (of all units for
            ``scope="global"``); counts are floored and every group keeps at least one unit.
        strategy: ``lowest`` (least memorizing first), ``highest`` (most memorizing first),
            ``random`` (seeded per group), or one of torch-pruning's criteria over the unit's
            whole group: ``magnitude`` (L2 weight norm, ``GroupMagnitudeImportance``),
            ``lamp`` (``LAMPImportance``), ``bnscale`` (network slimming's BatchNorm scale,
            ``BNScaleImportance``; CNNs only), ``taylor`` (``GroupTaylorImportance`` of the
            loss of ``gradients``) or ``hessian`` (Optimal Brain Damage,
            ``GroupHessianImportance``: weight² x the mean squared batch gradient of that
            loss; torch-pruning's own per-sample accumulation is not used, it keys its
            running sums inconsistently and keeps only the last sample).
        scope: ``layer`` (the ratio in every group) or ``global`` (one ranking over all groups,
            at most ``max_layer_ratio`` of any group; magnitudes are normalized per group by
            torch-pruning, UnitMem is comparable across layers as it is).
        keep_output_width: leave the channels that reach the output (the pooled feature width a
            head expects) alone; False prunes them too.
        heads: also remove whole ViT attention heads (``ratio`` of each attention's heads),
            scored by the mean of their units at the ``blocks.i.attn:heads`` sites; timm's
            ``num_heads`` and ``attn_dim`` are updated, fused attention keeps working.
        steps: remove the units in this many equal steps. Between steps the scores
            are recomputed by ``rescore(model) -> UnitMemResult`` when given (unit indices
            shift after each step, so old scores cannot be reused by position); without it the
            initial scores follow each surviving unit. Magnitudes are always recomputed.
        example_input: a batch for tracing (default: zeros at the encoder's input size).
        seed: seed of ``random``.
        latency_batch: batch size for the latency measurement (None: not measured).
        latency_time: seconds of timing per measurement.
        inplace: prune ``encoder`` itself instead of a copy.
        baseline_latency_s: the unpruned encoder's latency, when already measured (a sweep
            measures it once, so that every row's ratio has the same denominator).
        gradients: for ``taylor`` and ``hessian``: ``fn(model)`` accumulating a loss's
            gradient in the model's parameters (:func:`ssl_gradient_fn`, :func:`head_gradient_fn`),
            as a generator that yields after each batch's ``backward`` (``hessian`` squares
            each batch's gradient; ``taylor`` may also take a plain function); run on the
            current model before each step and cleared after.
        between_steps: ``fn(model)`` run on the shrunken encoder after every step but the
            last (the prune-recover loop: train it in place, e.g. with :func:`recover`).

    Returns:
        The pruned encoder (eval mode) and a :class:`PruneResult`.
    """
    check_options(ratio, strategy, scope, max_layer_ratio, steps, scores, rescore,
                  gradients, between_steps)  # fmt: skip
    model = (encoder if inplace else copy.deepcopy(encoder)).eval()
    if example_input is None:
        param = next(model.parameters())
        example_input = torch.zeros(1, *input_size(model), device=param.device)
    sites = prune_sites(model, scores, tuple(example_input.shape[1:]))
    if heads and not any(s.role == HEADS for s in sites):
        raise ConfigError(
            "heads=True needs attention head sites (blocks.i.attn:heads) in the scores or the"
            " encoder; this encoder has none, or the scores leave them out"
        )
    batch = None if baseline_latency_s is not None else latency_batch
    before = _measure(model, example_input, batch, latency_time)
    width = _output_width(model, example_input)
    if latency_batch and baseline_latency_s is not None:
        before = (*before[:2], baseline_latency_s)
    state = _State(scores=scores, rescore=rescore, seed=seed)
    entry = PRUNING_STRATEGIES[strategy]
    for step in range(1, steps + 1):
        state.step = step
        sites = _step_sites(model, sites, state, entry, tuple(example_input.shape[1:]))
        with grouped_convs(model):
            graph, groups = build_groups(model, sites, example_input, heads)
            todo = _start_groups(groups, state, entry, keep_output_width)
            if strategy == "activation":
                _activations(model, gradients)
            elif entry.needs == "gradients":
                _gradients(model, gradients, squared=strategy == "hessian")
            imps = {g.name: entry.importance(graph, model, g, state) for g in todo}
            model.zero_grad(set_to_none=True)
            _forget_activations(model)
            fraction = ratio * step / steps
            plan_fn = partial(_plan, imps=imps, fraction=fraction, scope=scope,
                              max_layer_ratio=max_layer_ratio, initial=state.initial)  # fmt: skip
            todo, plan = _checked_plan(model, todo, plan_fn, example_input, width,
                                       keep_output_width, state)  # fmt: skip
            _remove(graph, model, todo, plan, state)
        if between_steps is not None and step < steps:
            between_steps(model)
            model.eval()
    _check_runs(model, example_input, width, keep_output_width)
    after = _measure(model, example_input, latency_batch, latency_time)
    options = dict(strategy=strategy, ratio=float(ratio), scope=scope,
                   steps=steps, batch_size=latency_batch,
                   device=str(example_input.device))  # fmt: skip
    return model, _report(before, after, state, keep_output_width, options)


def _output_width(model: nn.Module, example: torch.Tensor) -> int:
    with evaluating(model), torch.inference_mode():
        return model(example).shape[-1]


def _check_runs(model: nn.Module, example: torch.Tensor, width: int, keep: bool) -> None:
    """Refuse a pruned encoder that no longer runs, or (``keep_output_width``) whose output
    width changed, after all its steps (each step's plan was tried on a copy already: this
    guards what ran between the steps)."""
    if why := _runs(model, example, width, keep):
        raise SiteError(
            f"pruning {_architecture(model)} left it broken ({why}): torch-pruning's"
            " dependency graph misses a coupling of this architecture; prune fewer sites"
            " (scores of some sites only) or another encoder"
        )


#: What torch-pruning raises when a group's removal goes wrong inside it.
_PRUNE_ERRORS = (RuntimeError, IndexError, TypeError, ValueError, KeyError, AssertionError)


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}"


def _copy_and_graph(model, example):
    clear_caches(model)  # tensors a traced forward cached cannot be deep-copied
    trial = copy.deepcopy(model)
    return trial, dependency_graph(trial, example)


def _runs(trial, example, width: int, keep: bool) -> str:
    """Why ``trial`` is broken ('' when it runs and, under ``keep``, keeps ``width``)."""
    try:
        got = _output_width(trial, example)
    except _PRUNE_ERRORS as err:
        return _why(err)
    return f"changes the output width {width} -> {got}" if keep and got != width else ""


def _trial(model, groups: list[Group], plan: dict, example, width: int, keep: bool) -> str:
    """Why removing ``plan`` from ``groups`` breaks a copy of ``model`` ('')."""
    trial, graph = _copy_and_graph(model, example)
    try:
        for g in groups:
            prune_group(graph, trial, g, plan[g.name])
    except (*_PRUNE_ERRORS, SiteError) as err:
        return _why(err)
    return _runs(trial, example, width, keep)


def _broken_groups(model, groups: list[Group], plan: dict, example, width, keep) -> dict:
    """Group name -> why, for the groups whose removal breaks a copy of ``model`` once the
    groups before them are removed: they are pruned one after the other on one copy, run
    after each; a break marks that group and starts a fresh copy holding the good ones (one
    dependency graph per broken group, not one per group)."""
    broken, good = {}, []
    trial, graph = _copy_and_graph(model, example)
    for g in groups:
        try:
            prune_group(graph, trial, g, plan[g.name])
            why = _runs(trial, example, width, keep)
        except (*_PRUNE_ERRORS, SiteError) as err:
            why = _why(err)
        if not why:
            good.append(g)
            continue
        broken[g.name] = why
        trial, graph = _copy_and_graph(model, example)
        for ok in good:
            prune_group(graph, trial, ok, plan[ok.name])
    return broken


def _checked_plan(model, todo, plan_fn, example, width, keep, state: _State):
    """The groups to prune and their plan, after a trial on a copy of ``model``.

    torch-pruning's dependency graph misses couplings of some architectures (channel splits
    of fixed sizes, reshapes by a stored width, norms over a channel-last axis it does not
    see): removing such a group leaves a model that fails at its next forward, or narrows
    the output. The whole plan is tried first (one copy: the usual case); when it breaks,
    the groups are tried one after another (:func:`_broken_groups`), the ones that break are
    left unpruned, each with its reason in ``PruneResult.groups`` and a warning, and the rest
    is planned again and tried again. Groups left out at one step stay out at the next.
    """

    def left_out(g: Group) -> bool:  # by a trial at an earlier step
        first = state.info.get(g.name)
        return first is not None and bool(first.blocked or (keep and first.output))

    todo = [g for g in todo if not left_out(g)]
    plan = plan_fn(todo)
    if not _trial(model, todo, plan, example, width, keep):
        _check_left(model, todo, state)
        return todo, plan
    broken = _broken_groups(model, todo, plan, example, width, keep)
    for name, reason in broken.items():
        if reason.startswith("changes the output width"):  # its channels reach the output
            state.info[name].output = True
        else:
            state.info[name].blocked = f"removing its units breaks the model ({reason})"
    warnings.warn(
        f"{len(broken)} groups of {_architecture(model)} left unpruned, torch-pruning"
        " cannot remove their units here: " + "; ".join(
            f"{n}: {r}" for n, r in list(broken.items())[:3]),
        UserWarning,
        stacklevel=4,
    )  # fmt: skip
    todo = [g for g in todo if g.name not in broken]
    plan = plan_fn(todo)
    if why := _trial(model, todo, plan, example, width, keep):
        raise SiteError(
            f"pruning {_architecture(model)} breaks it ({why}) even without the groups that"
            " break it alone: torch-pruning's graph misses a coupling between groups; prune"
            " fewer sites (scores of some sites only)"
        )
    _check_left(model, todo, state)
    return todo, plan


def _check_left(model, todo: list[Group], state: _State) -> None:
    """Refuse a run that can remove nothing of a kind it was asked to prune."""

    def kind(g: Group) -> str:  # a grouped convolution's groups are units too
        return HEADS if g.kind == HEADS else UNITS

    for missing in {kind(g) for g in state.info.values()} - {kind(g) for g in todo}:
        why = sorted({g.blocked or "its channels reach the output" for g in state.info.values()
                      if kind(g) == missing})  # fmt: skip
        raise SiteError(
            f"no {missing} group of {_architecture(model)} can be pruned: "
            + "; ".join(why[:3])
            + ("; heads=False prunes the units alone" if missing == HEADS else "")
        )


class _AccumulatedActivation(tp.importance.ActivationImportance):
    """torch-pruning's activation criterion (the mean |input| of each channel into the layers
    that consume it), read from :func:`_activations`' means over every batch; torch-pruning's
    own hook keeps only the last forward pass's."""

    @contextmanager
    def compute_importance(self, model):  # the means are already in place
        yield


def _activations(model: nn.Module, feed) -> None:
    """Leave on each conv and linear layer ``_importance``: the mean |input| per input channel
    over every batch that ``feed(model)`` runs through the model (in eval mode)."""
    sums: dict[nn.Module, list] = {}

    def hook(module, inputs, output):
        x = inputs[0].detach().abs()
        x = x.transpose(0, 1).flatten(1) if isinstance(module, nn.Conv2d) else x.flatten(0, -2).T
        total = sums.setdefault(module, [0.0, 0])
        total[0] = total[0] + x.sum(1).double()
        total[1] += x.shape[1]

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]  # fmt: skip
    try:
        with evaluating(model), torch.enable_grad():
            for _ in feed(model) or ():
                pass
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    if not sums:
        raise ConfigError("strategy 'activation': gradients(model) ran no batch through the model")
    for module, (total, n) in sums.items():
        module._importance = (total / n).float()


def _forget_activations(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "_importance"):
            del m._importance


def _gradients(model: nn.Module, gradients, squared: bool) -> None:
    """Leave in each parameter's ``.grad`` the loss's gradient, or (``squared``) the mean over
    batches of its square, in eval mode (no norm statistic moves)."""
    model.zero_grad(set_to_none=True)
    with evaluating(model), torch.enable_grad():
        batches = gradients(model)
        if not squared:
            for _ in batches or ():
                pass
            return
        if batches is None:
            raise ConfigError(
                "strategy 'hessian' needs each batch's gradient: gradients(model) must be a"
                " generator yielding after each backward (as ssl_gradient_fn and head_gradient_fn"
                " are)"
            )
        total, n = {}, 0
        for _ in batches:
            for p in model.parameters():
                if p.grad is not None:
                    total[p] = total.get(p, 0) + p.grad.detach() ** 2
            model.zero_grad(set_to_none=True)
            n += 1
        for p, sq in total.items():
            p.grad = sq / n


def _step_sites(model, sites, state: _State, entry: Strategy, size) -> list[Site]:
    """The sites to prune at this step: rescored (``rescore``) or the same, at new widths."""
    if state.step == 1:
        return sites
    if state.rescore is not None and entry.needs == "scores":
        state.scores = state.rescore(model)
        return prune_sites(model, state.scores, size)
    return find_sites(model, "units", include=[s.name for s in sites], input_size=size)


def _start_groups(groups: list[Group], state: _State, entry: Strategy, keep_output_width: bool):
    """Record each group's initial state at step 1 (warning about blocked groups); the groups
    that may be pruned."""
    if state.step == 1:
        for g in groups:
            state.initial[g.name], state.info[g.name], state.removed[g.name] = g.width, g, []
            state.origin[g.name] = torch.arange(g.width)
            if entry.needs == "scores" and not g.blocked:
                state.base[g.name] = g.unit_scores(state.scores.scores())
        if blocked := [f"{g.name}: {g.blocked}" for g in groups if g.blocked]:
            more = f"; and {len(blocked) - 3} more" if len(blocked) > 3 else ""
            warnings.warn(
                f"{len(blocked)} groups left unpruned: " + "; ".join(blocked[:3]) + more,
                UserWarning,
                stacklevel=3,
            )
    return [g for g in groups if not (keep_output_width and g.output) and not g.blocked]


def _remove(graph, model, todo: list[Group], plan: dict, state: _State) -> None:
    """Remove the planned units and keep track of which original units are gone."""
    for g in todo:
        units = plan[g.name]
        prune_group(graph, model, g, units)
        state.removed[g.name] += state.origin[g.name][units].tolist()
        keep = torch.ones(g.width, dtype=torch.bool)
        keep[units] = False
        state.origin[g.name] = state.origin[g.name][keep]


def _report(before, after, state: _State, keep_output_width: bool, options: dict) -> PruneResult:
    (params0, macs0, lat0), (params1, macs1, lat1) = before, after
    groups = [
        {
            "name": name, "kind": g.kind, "sites": [*g.sites, *g.partner_sites],
            "before": state.initial[name], "after": len(state.origin[name]),
            "removed": sorted(state.removed[name]),
            "output": g.output, "pruned": not (keep_output_width and g.output) and not g.blocked,
            "blocked": g.blocked,
        }
        for name, g in state.info.items()
    ]  # fmt: skip
    return PruneResult(
        params=(params0, params1), macs=(macs0, macs1),
        latency_s=None if lat0 is None else (lat0, lat1), groups=groups, **options,
    )  # fmt: skip
