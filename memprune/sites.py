"""Unit and layer sites of an encoder (docs/method.md §1).

A *unit site* is a module whose output is read per unit (channel or hidden neuron); a *layer
site* is a point in the forward pass whose whole output is one representation. Sites are found
by running one dry forward pass with hooks on the real model and reading the order in which
modules run, so they work for any timm CNN or ViT:

* CNN units: every activation that follows a conv + norm (timm ResNets: ``act1``,
  ``layerS.B.act1``, ``layerS.B.act2``; EfficientNet/MobileNet/RegNet: ``*.bn1.act``, ...).
  Activations after a conv without a norm are units only when a BatchNorm over their
  channels comes next (ConvMixer's conv -> act -> norm); squeeze-excite gates are not units.
  LeViT's linear + BatchNorm1d -> act counts too (tokens, channels last).
* MLP units: the activation inside an MLP (``fc1 -> act -> fc2``): ViT ``blocks.i.mlp.act``,
  ConvNeXt ``stages.S.blocks.B.mlp.act``; PVT's ``fc1 -> depthwise conv -> act`` counts as
  ``fc1``'s units (a depthwise conv keeps channels apart).
* Attention units: the output projection ``*.proj`` of a module with an integer
  ``num_heads`` (ViT ``blocks.i.attn.proj``, EfficientFormer's ``token_mixer.proj``, CoAtNet's
  1x1-conv attention), and the heads' outputs entering it, ``...attn:heads`` (``num_heads x
  head_dim`` units, read as the input of ``proj``), so that a head can be scored by the mean
  of its own units (docs/method.md §9; an addition to §1, which lists only the projection's
  outputs).
* CNN layers: the stem output and every block of every stage (a stage is a container whose
  children all hold convolutions); for a plain sequential CNN, every conv block.
* ViT layers: two per transformer block, ``blocks.i:after_attn`` (block input + attention
  branch, read as the input of ``norm2``) and ``blocks.i:after_mlp`` (the block output).
* Where neither layer rule finds anything (DLA's trees, LeViT's blocks without norms): the
  stage outputs timm lists in ``model.feature_info``.

Any ``nn.Module`` works when sites are named by module-name patterns (``include=``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from memprune.encoders import check_input_size, evaluating, input_size
from memprune.errors import ConfigError, SiteError

KINDS = ("units", "layers")

_CONV = (nn.modules.conv._ConvNd,)
_LINEAR = (nn.Linear,)
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
#: Name of the site that is the encoder's own output (pre-logits features).
OUTPUT = "output"


def is_conv(module: nn.Module) -> bool:
    """A convolution of any dimension."""
    return isinstance(module, _CONV)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, _LINEAR)


def is_norm(module: nn.Module) -> bool:
    """A batch, group, layer or local-response normalization."""
    return isinstance(module, _NORM)


#: Activations whose output is >= 0 (the signed-activation rule is a no-op there).
_NONNEG_ACTS = (nn.ReLU, nn.ReLU6)


def _activation_types() -> tuple[type, ...]:
    acts = [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.CELU]
    acts += [nn.SELU, nn.Mish, nn.PReLU, nn.Softplus, nn.Tanh]
    try:
        from timm.layers import activations, activations_me

        for mod in (activations, activations_me):
            for obj in vars(mod).values():
                is_module = isinstance(obj, type) and issubclass(obj, nn.Module)
                if is_module and "sigmoid" not in obj.__name__.lower():  # gates, not units
                    acts.append(obj)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(acts)


_ACTS = _activation_types()


@dataclass(frozen=True)
class Site:
    """A place in the forward pass that memprune reads.

    Attributes:
        name: unique name (the module path, or ``blocks.i:after_attn`` / ``:after_mlp``).
        module: path of the hooked module.
        kind: ``units`` or ``layers``.
        role: ``conv``, ``mlp``, ``attn``, ``stem``, ``block``, ``after_attn``, ``after_mlp``
            or ``custom``.
        n_units: number of units (channels / hidden neurons) along ``channel_axis``.
        channel_axis: ``1`` (NCHW, [B, C]) or ``-1`` (tokens [B, T, D], NHWC).
        point: ``output`` (the module's output) or ``input`` (its first input).
        shape: output shape without the batch dimension, at the discovery input size.
        nonneg: the output is known to be >= 0 (ReLU), so the signed rule can be skipped.
        source: the module whose output channels are these units (the conv or norm before a
            CNN activation, ``fc1`` of an MLP, ``attn.proj`` itself); for ``heads`` sites the
            module whose *input* channels they are. Pruning maps unit scores through it.
        windows: rows of the activation's batch per image (> 1 inside windowed attention or
            unfolded patches: Swin, MaxViT, TinyViT, MobileViT run a window per batch row);
            reducers fold them back into one row per image.
    """

    name: str
    module: str
    kind: str
    role: str
    n_units: int
    channel_axis: int = 1
    point: str = "output"
    shape: tuple[int, ...] = ()
    nonneg: bool = False
    source: str = ""
    windows: int = 1


@dataclass
class _Trace:
    events: list[tuple[str, str]]  # ("enter" | "exit", module name) in execution order
    calls: dict[str, int]
    shapes: dict[str, tuple[int, ...]]  # output shape without batch
    in_shapes: dict[str, tuple[int, ...]]
    batches: dict[str, int] = field(default_factory=dict)  # output batch per input image
    in_batches: dict[str, int] = field(default_factory=dict)


def trace(model: nn.Module, example: torch.Tensor) -> _Trace:
    """Run ``model(example)`` once in eval mode, recording the order modules run in."""
    check_input_size(model, tuple(example.shape[-2:]))
    events, calls, shapes, in_shapes = [], {}, {}, {}
    batches, in_batches, images = {}, {}, max(len(example), 1)
    handles = []

    def pre(name):
        def hook(_mod, args):
            events.append(("enter", name))
            calls[name] = calls.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor):
                in_shapes[name] = tuple(args[0].shape[1:])
                in_batches[name] = max(args[0].shape[0] // images, 1) if args[0].ndim else 1

        return hook

    def post(name):
        def hook(_mod, _args, out):
            events.append(("exit", name))
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape[1:])
                batches[name] = max(out.shape[0] // images, 1) if out.ndim else 1

        return hook

    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_pre_hook(pre(name)))
                handles.append(mod.register_forward_hook(post(name)))
        with evaluating(model), torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return _Trace(events, calls, shapes, in_shapes, batches, in_batches)


def _example(model: nn.Module, size: tuple[int, int, int] | None) -> torch.Tensor:
    size = size or input_size(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    return torch.zeros(1, *size, device=device)


def weight_modules(modules, tr: _Trace, stop: int, with_norm: bool = True):
    """Modules among conv/linear(/norm) entered before event ``stop``, most recent first."""
    kinds = _CONV + _LINEAR + (_NORM if with_norm else ())
    for kind, name in reversed(tr.events[:stop]):
        if kind == "enter" and isinstance(modules[name], kinds):
            yield name, modules[name]


def output_site(dim: int) -> Site:
    """The encoder's own output (pre-logits features ``[B, dim]``) as a layer site."""
    return Site(OUTPUT, "", "layers", "output", dim, 1, "output", (dim,))


def _unit_site(name: str, modules, tr: _Trace) -> Site | None:
    """The unit site of activation ``name``, or None when it is not a unit (docs/method.md §1)."""
    start = tr.events.index(("enter", name))
    preceding = list(weight_modules(modules, tr, start))[:2]
    if not preceding:
        return None
    first_name, first = preceding[0]
    shape = tr.shapes.get(name, ())
    nonneg = isinstance(modules[name], _NONNEG_ACTS)
    if isinstance(first, _NORM) and len(preceding) > 1 and isinstance(preceding[1][1], _CONV):
        if len(shape) < 1:
            return None
        return Site(
            name, name, "units", "conv", shape[0], 1, shape=shape, nonneg=nonneg, source=first_name
        )
    if (isinstance(first, nn.BatchNorm1d) and len(preceding) > 1
            and isinstance(preceding[1][1], _LINEAR) and shape
            and shape[-1] == first.num_features):  # fmt: skip
        # LeViT's linear + BatchNorm1d -> act: the linear layer's units, tokens last
        return Site(
            name, name, "units", "mlp", shape[-1], -1, shape=shape, nonneg=nonneg, source=first_name
        )
    if isinstance(first, _CONV) and _norm_follows(name, modules, tr, shape):
        # conv -> act -> norm (ConvMixer): the conv's channels, normalized after the act
        return Site(
            name, name, "units", "conv", shape[0], 1, shape=shape, nonneg=nonneg, source=first_name
        )
    parent = modules.get(name.rpartition(".")[0])
    if _depthwise(first) and len(preceding) > 1 and preceding[1][0].endswith(".fc1"):
        first_name, first = preceding[1]  # PVT's fc1 -> depthwise conv -> act: fc1's units
    if (
        isinstance(first, _CONV + _LINEAR)
        and first_name.rpartition(".")[2] == "fc1"
        and parent is not None
        and hasattr(parent, "fc2")
    ):
        axis = 1 if isinstance(first, _CONV) else -1
        units = _units(shape, axis)
        return Site(
            name, name, "units", "mlp", units, axis, shape=shape, nonneg=nonneg, source=first_name
        )
    return None


def _norm_follows(name: str, modules, tr: _Trace, shape) -> bool:
    """The next conv / linear / norm to run after activation ``name`` is a BatchNorm over
    its channels."""
    if len(shape) != 3:
        return False
    after = tr.events[tr.events.index(("exit", name)) + 1 :]
    kinds = _CONV + _LINEAR + _NORM
    nxt = next(
        (modules[n] for k, n in after if k == "enter" and isinstance(modules[n], kinds)), None
    )
    return isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == shape[0]


def _head_proj(name: str, module: nn.Module, modules) -> bool:
    """The output projection of a multi-head attention: ``*.proj``, a linear layer or a 1x1
    convolution, in a module with an integer ``num_heads`` (timm's ``attn``, EfficientFormer's
    ``token_mixer``, CoAtNet's ``Attention2d``)."""
    if not name.endswith(".proj"):
        return False
    parent = modules.get(name.rpartition(".")[0])
    if not isinstance(getattr(parent, "num_heads", None), int):
        return False
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) and module.groups == 1
    return isinstance(module, nn.Linear)


def _depthwise(module: nn.Module) -> bool:
    """A depthwise conv keeps each channel apart: its units are those of the layer before."""
    return (
        isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
    )


def _auto_unit_sites(model: nn.Module, tr: _Trace) -> list[Site]:
    modules = dict(model.named_modules())
    sites = []
    for kind, name in tr.events:
        if kind != "enter" or tr.calls.get(name) != 1:
            continue
        mod = modules[name]
        if isinstance(mod, _ACTS):
            site = _unit_site(name, modules, tr)
        elif _head_proj(name, mod, modules):
            attn = name.rpartition(".")[0]
            conv = isinstance(mod, nn.Conv2d)  # CoAtNet's 1x1 conv attention: channels first
            axis, at = (1, 0) if conv else (-1, -1)  # traced shapes leave out the batch
            if name in tr.in_shapes:
                shape = tr.in_shapes[name]  # the heads' outputs, concatenated
                heads = Site(f"{attn}:heads", name, "units", "heads", shape[at], axis, "input")
                sites.append(replace(heads, shape=shape, source=name))
            shape = tr.shapes[name]
            site = Site(name, name, "units", "attn", shape[at], axis, shape=shape, source=name)
        else:
            site = None
        if site is not None:
            sites.append(site)
    return sites


def _contains_conv(model: nn.Module) -> set[str]:
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, _CONV):
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    return names


def _units(shape: tuple[int, ...], axis: int) -> int:
    """Size of tensor axis ``axis`` (batch included) given the shape without batch."""
    return shape[axis - 1] if axis > 0 else shape[axis]


def _layer_axis(shape: tuple[int, ...]) -> int:
    return -1 if len(shape) == 2 else 1  # [T, D] tokens; [C, H, W] maps; [C] vectors


def _child(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _below(name: str, ancestor: str) -> bool:
    """``name`` is a proper descendant of ``ancestor`` ("" is the root)."""
    return name != ancestor and (ancestor == "" or name.startswith(ancestor + "."))


def _auto_layer_sites(model: nn.Module, tr: _Trace) -> list[Site]:
    modules = dict(model.named_modules())
    order: dict[str, int] = {}  # when each module starts
    done: dict[str, int] = {}  # when each module's output is ready
    for i, (kind, name) in enumerate(tr.events):
        (order if kind == "enter" else done).setdefault(name, i)
    ran_once = {n for n, c in tr.calls.items() if c == 1}
    sites: list[tuple[int, Site]] = []

    # Transformer blocks: after the attention residual (input of norm2) and after the MLP.
    blocks = [
        n
        for n, m in modules.items()
        if n in ran_once and f"{n}.norm2" in ran_once and hasattr(m, "attn") and hasattr(m, "mlp")
    ]
    for n in blocks:
        shape = tr.shapes[n]
        attn = Site(
            f"{n}:after_attn",
            f"{n}.norm2",
            "layers",
            "after_attn",
            shape[-1],
            -1,
            "input",
            tr.in_shapes[f"{n}.norm2"],
        )
        mlp = Site(f"{n}:after_mlp", n, "layers", "after_mlp", shape[-1], -1, "output", shape)
        sites += [(order[f"{n}.norm2"], attn), (done[n], mlp)]

    # CNN stages: the deepest containers whose children all hold convolutions.
    with_conv = _contains_conv(model)
    stages = [
        n
        for n, m in modules.items()
        if m._modules
        and all(_child(n, c) in with_conv for c in m._modules)
        and not any(n == b or _below(n, b) for b in blocks)
    ]
    stages = [s for s in stages if not any(_below(o, s) for o in stages)]
    cnn_blocks = sorted(
        (_child(s, c) for s in stages for c in modules[s]._modules),
        key=lambda n: order.get(n, len(order)),
    )
    cnn_blocks = [n for n in cnn_blocks if n in ran_once and n in tr.shapes]
    for n in cnn_blocks:
        shape = tr.shapes[n]
        axis = _layer_axis(shape)
        site = Site(n, n, "layers", "block", _units(shape, axis), axis, shape=shape)
        sites.append((done[n], site))

    # Stem: the last top-level module run before the stage holding the first block.
    if cnn_blocks and "." in cnn_blocks[0]:
        top = cnn_blocks[0].split(".")[0]
        start = order.get(top, order.get(cnn_blocks[0], len(order)))  # a ModuleList never runs
        before = sorted(
            (c for c in model._modules if c in ran_once and c in tr.shapes and order[c] < start),
            key=order.__getitem__,
        )
        if before:
            stem, shape = before[-1], tr.shapes[before[-1]]
            axis = _layer_axis(shape)
            site = Site(stem, stem, "layers", "stem", _units(shape, axis), axis, shape=shape)
            sites.append((done[stem], site))
    if not sites:  # neither rule fits (DLA's trees, LeViT's norm-free blocks): timm's stages
        sites = _feature_info_sites(model, tr, done, ran_once)
    return [s for _, s in sorted(sites, key=lambda p: p[0])]


def _feature_info_sites(model: nn.Module, tr: _Trace, done: dict, ran_once: set) -> list:
    """The stage outputs timm lists in ``model.feature_info`` (its ``features_only`` taps)."""
    sites = []
    for info in getattr(model, "feature_info", None) or []:
        n = info.get("module") if isinstance(info, dict) else None
        if n in ran_once and n in tr.shapes:
            shape = tr.shapes[n]
            axis = _layer_axis(shape)
            sites.append((done[n], Site(n, n, "layers", "block", _units(shape, axis), axis,
                                        shape=shape)))  # fmt: skip
    return sites


def _custom_site(name: str, kind: str, modules, tr: _Trace) -> Site:
    if tr.calls.get(name, 0) != 1:
        raise SiteError(
            f"module {name!r} ran {tr.calls.get(name, 0)} times in one forward pass; a site must"
            " run exactly once (name a module that is not reused)"
        )
    shape = tr.shapes.get(name)
    if shape is None:
        raise SiteError(f"module {name!r} does not return a tensor; it cannot be a site")
    if kind == "layers" or len(shape) < 2:
        axis = _layer_axis(shape)
    else:  # channels follow the last conv (axis 1) or linear (axis -1) run up to this output
        stop = tr.events.index(("exit", name))
        last = next(weight_modules(modules, tr, stop, with_norm=False), (None, None))[1]
        axis = -1 if isinstance(last, _LINEAR) else 1
    nonneg = isinstance(modules[name], _NONNEG_ACTS)
    stop = tr.events.index(("exit", name))
    source = next(weight_modules(modules, tr, stop), ("", None))[0]
    units = _units(shape, axis)
    return Site(name, name, kind, "custom", units, axis, shape=shape, nonneg=nonneg, source=source)


def find_sites(
    model: nn.Module,
    kind: str = "units",
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> list[Site]:
    """Unit or layer sites of ``model`` in forward order (see the module docstring).

    Args:
        model: a timm model or any ``nn.Module``.
        kind: ``units`` or ``layers``.
        include: glob patterns (``fnmatch``) over site names. A pattern that matches
            auto-discovered sites selects those; a pattern that matches none of them selects
            modules by name (any ``nn.Module``). A pattern matching nothing is an error.
        exclude: glob patterns removing sites.
        input_size: ``(C, H, W)`` of the dry forward pass (default: the model's input size).
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    include = [include] if isinstance(include, str) else list(include or [])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    tr = trace(model, _example(model, input_size))
    auto = _auto_unit_sites(model, tr) if kind == "units" else _auto_layer_sites(model, tr)
    if include:
        modules = dict(model.named_modules())
        chosen: dict[str, Site] = {}
        for pattern in include:
            hits = [s for s in auto if fnmatch.fnmatchcase(s.name, pattern)]
            if not hits:
                names = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
                hits = [_custom_site(n, kind, modules, tr) for n in names]
            if not hits:
                known = ", ".join(s.name for s in auto[:6]) or ", ".join(list(modules)[1:7])
                raise SiteError(
                    f"site pattern {pattern!r} matches no {kind} site and no module of"
                    f" {type(model).__name__} (e.g. {known}, ...); see memprune.find_sites()"
                )
            chosen.update((s.name, s) for s in hits)
        sites = list(chosen.values())
    else:
        sites = auto
        if not sites:
            raise SiteError(
                f"found no {kind} sites in {type(model).__name__}: name them with include="
                " module-name patterns (e.g. include=['features.*.relu'])"
            )
    sites = [s for s in sites if not any(fnmatch.fnmatchcase(s.name, p) for p in exclude)]
    if not sites:
        raise SiteError(f"exclude={exclude} removed every {kind} site")
    return [_windowed(s, tr) for s in sites]


def _windowed(site: Site, tr: _Trace) -> Site:
    """``site`` with its batch rows per image (windows), from the traced batch sizes."""
    rows = (tr.in_batches if site.point == "input" else tr.batches).get(site.module, 1)
    return replace(site, windows=rows) if rows != site.windows else site


def resolve_sites(
    model: nn.Module, sites: list[Site] | list[str] | str | None, kind: str
) -> list[Site]:
    """Sites given as Site objects, patterns, or None (auto-discovery)."""
    if sites is None or isinstance(sites, str):
        return find_sites(model, kind, include=sites)
    sites = list(sites)
    if all(isinstance(s, Site) for s in sites):
        modules = dict(model.named_modules())
        missing = [s.module for s in sites if s.module not in modules]
        if missing:
            raise SiteError(f"sites not in {type(model).__name__}: {', '.join(missing)}")
        return [s if s.kind == kind else replace(s, kind=kind) for s in sites]
    if all(isinstance(s, str) for s in sites):
        return find_sites(model, kind, include=sites)
    raise ConfigError("sites must be None, a list of patterns, or a list of Site objects")
