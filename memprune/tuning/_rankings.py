"""Per-layer rankings from one encoder, for choosing which layers to fine-tune without a
reference encoder: the UnitMem profile and Auto-RGN.

* UnitMem profile: the mean UnitMem, and the fraction of units above 0.5, of the unit sites
  each layer owns (a unit site belongs to the layer that owns its module, see
  :func:`layer_modules`).
* Auto-RGN (Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts",
  ICLR 2023): the relative gradient norm ``||grad|| / ||theta||`` of each layer's parameters
  for the downstream task. The paper computes it per parameter tensor at every step to scale
  learning rates; here it ranks whole layers once before fine-tuning: a linear head is first
  fitted on the frozen encoder's features (a random head would make the gradients
  arbitrary), then the cross-entropy gradient of every encoder parameter is summed over the
  downstream training data with the encoder in eval mode, and a layer's RGN is the norm of
  its parameters' gradient over the norm of those parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from memprune.encoders import input_size, resolve_device, weights_hash
from memprune.engine import Normalizer, resolve_normalize
from memprune.errors import ConfigError
from memprune.probe import extract_features
from memprune.results import Result
from memprune.sites import find_sites
from memprune.tuning._select import layer_modules, layer_parameters


@dataclass
class LayerValues(Result):
    """One value per layer, by name, that :func:`memprune.select_layers` can rank by.

    ``values[by]`` is ``[L]`` over ``layers`` (forward order); ``counts`` what each value
    is made of (units, parameters) per layer.
    """

    kind = "layer_values"
    layers: list[str]
    values: dict[str, torch.Tensor]
    counts: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def rankings(self) -> tuple[str, ...]:
        """The names :meth:`ranking` (and ``select_layers(by=...)``) accepts."""
        return tuple(self.values)

    def ranking(self, by: str) -> torch.Tensor:
        """The value of every layer ``[L]`` under ranking ``by``."""
        return self.values[by]

    def to_rows(self) -> list[dict]:
        return [
            {"layer": layer, **{k: float(v[i]) for k, v in self.values.items()},
             "count": int(self.counts[i])}
            for i, layer in enumerate(self.layers)
        ]  # fmt: skip

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, **{f"values/{k}": v for k, v in self.values.items()}}

    def _fields(self) -> dict:
        return {"layers": self.layers, "names": list(self.values)}

    @classmethod
    def _build(cls, t, fields, meta):
        values = {k: t[f"values/{k}"] for k in fields["names"]}
        return cls(fields["layers"], values, t["counts"], meta)


def unitmem_profile(scores, encoder: nn.Module) -> LayerValues:
    """Per layer: ``unitmem`` (mean UnitMem of the units of the unit sites it owns) and
    ``unitmem_frac`` (their fraction above 0.5); NaN for a layer that owns no scored unit.

    ``scores``: a :class:`~memprune.UnitMemResult` of ``encoder``.
    """
    owned = layer_modules(encoder)
    units = {s.name: s for s in find_sites(encoder, "units", input_size=input_size(encoder))}
    unknown = [n for n in scores.sites if n not in units]
    if unknown:
        raise ConfigError(
            f"UnitMem sites {unknown[:3]} are not unit sites of this encoder: the scores were"
            " made on another encoder; score this one (memprune.unit_mem)"
        )
    per_layer: dict[str, list[torch.Tensor]] = {layer: [] for layer in owned}

    def owner(module: str) -> str | None:
        inside = [layer for layer, mods in owned.items()
                  if any(module == m or module.startswith(m + ".") for m in mods)]  # fmt: skip
        return inside[0] if inside else None

    for name, s in scores.sites.items():
        layer = owner(units[name].module)
        if layer is not None:
            per_layer[layer].append(s["score"].double())
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    cat = {layer: torch.cat(v) if v else None for layer, v in per_layer.items()}
    mean = torch.stack([v.mean() if v is not None else nan for v in cat.values()])
    frac = torch.stack([(v > 0.5).double().mean() if v is not None else nan for v in cat.values()])
    counts = torch.tensor([0 if v is None else len(v) for v in cat.values()])
    meta = {
        "kind": "unitmem_profile",
        "weights": scores.meta.get("weights"),
        "unitmem": scores.meta,
    }
    return LayerValues(list(owned), {"unitmem": mean, "unitmem_frac": frac}, counts, meta)


def _fit_head(features: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> nn.Linear:
    """A linear head on standardized features, full-batch L-BFGS on the cross-entropy."""
    torch.manual_seed(seed)
    n_classes = int(labels.max()) + 1
    head = nn.Linear(features.shape[1], n_classes).double()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    x = features.double()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), labels) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.float()


def auto_rgn(
    encoder: nn.Module,
    train: Dataset,
    batch_size: int = 128,
    head_steps: int = 100,
    normalize="auto",
    seed: int = 0,
    device=None,
) -> LayerValues:
    """Auto-RGN per layer (module docstring): ``rgn`` = ||grad|| / ||theta|| of each layer's
    parameters for a linear head on ``train`` (items ``(image, label, index)``)."""
    if len(train) < 2:
        raise ConfigError(f"Auto-RGN needs labelled training data, got {len(train)} points")
    device = resolve_device(device)
    feats = extract_features(encoder, train, normalize=normalize, device=device, progress=False)
    mean, std = feats.features.mean(0), feats.features.std(0).clamp_min(1e-6)
    head = _fit_head((feats.features - mean) / std, feats.labels, head_steps, seed).to(device)
    model = copy.deepcopy(encoder).to(device).eval()  # eval: norm statistics stay put
    norm = Normalizer(resolve_normalize(encoder, normalize), device)
    model.zero_grad()
    for images, labels, _ in DataLoader(train, batch_size=batch_size):
        z = (model(norm(images.to(device))) - mean.to(device)) / std.to(device)
        loss = F.cross_entropy(head(z), labels.to(device), reduction="sum") / len(train)
        loss.backward()
    layers = list(layer_modules(model))
    params = dict(model.named_parameters())
    grad2, theta2, counts = (dict.fromkeys(layers, 0) for _ in range(3))
    for name, layer in layer_parameters(model, layers).items():
        p = params[name]
        grad2[layer] += 0.0 if p.grad is None else float(p.grad.double().square().sum())
        theta2[layer] += float(p.detach().double().square().sum())
        counts[layer] += p.numel()
    rgn = torch.tensor(
        [(grad2[n] / theta2[n]) ** 0.5 if theta2[n] else float("nan") for n in layers],
        dtype=torch.float64,
    )
    meta = {"kind": "auto_rgn", "weights": weights_hash(encoder)[:16], "batch_size": batch_size,
            "head_steps": head_steps, "seed": seed, "n_train": len(train)}  # fmt: skip
    return LayerValues(layers, {"rgn": rgn}, torch.tensor([counts[n] for n in layers]), meta)
