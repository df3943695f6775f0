"""``evaluate``: linear-probe and kNN accuracy of the frozen encoders on train -> test, one
table (f, and g and the supervised encoder where the run has them, or the encoders named)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memprune.recipes._stages import Stage, StageResult


@dataclass
class ProbeAccuracies(StageResult):
    """Encoder -> probe kind (``linear``, ``knn``) -> test accuracy."""

    accuracy: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return dict(self.accuracy)

    @classmethod
    def from_dict(cls, data: dict):
        return cls(accuracy={k: v for k, v in data.items() if isinstance(v, dict)})


def encoders(recipe) -> list[str]:
    """The encoders the stage probes."""
    if recipe.evaluation.encoders:
        return list(recipe.evaluation.encoders)
    e = recipe.encoder
    return ["f", *(["g"] if e.pretrain or e.reference else []),
            *(["supervised"] if e.supervised.enabled else [])]  # fmt: skip


def probe_options(ctx) -> dict:
    """How every probe of a run is fitted (this stage, and the prune and finetune stages'
    comparisons)."""
    r, e = ctx.recipe, ctx.recipe.evaluation
    return dict(backend=e.backend, Cs=e.cs, seed=r.seed, device=r.device, precision=r.precision,
                chunk_size=e.chunk_size, cache_dir=e.cache_dir, store=e.store)  # fmt: skip


def probe(ctx, model, train, test, seed: int | None = None):
    """The linear probe of ``model`` as every stage of the run fits it (a ProbeResult)."""
    from memprune.probe import linear_probe

    opts = probe_options(ctx)
    if seed is not None:
        opts["seed"] = seed
    return linear_probe(model, train, test, **opts)


def accuracy(ctx, model, train, test, seed: int | None = None) -> float:
    """Linear-probe test accuracy of ``model`` as every stage of the run fits it."""
    return probe(ctx, model, train, test, seed).accuracy


def run(ctx, out: Path) -> ProbeAccuracies:
    from memprune._io import write_json
    from memprune._table import write_table
    from memprune.probe import knn_probe, linear_probe
    from memprune.report import plot_confusion

    r, e = ctx.recipe, ctx.recipe.evaluation
    names = encoders(r)
    models = [ctx.encoder(n) for n in names]  # every encoder is read before any work
    train, test = ctx.probe_train, ctx.test
    opts = probe_options(ctx)
    knn_opts = {k: v for k, v in opts.items() if k not in ("backend", "Cs")}
    rows, records, accuracy = [], [], {}
    classes = None
    for i, (name, model) in enumerate(zip(names, models)):
        probes = {}
        if e.linear:
            probes["linear"] = linear_probe(model, train, test, **opts)
        if e.knn:
            probes["knn"] = knn_probe(model, train, test, **knn_opts)
        record = {"encoder": name, "model": ctx.model_name(name),
                  "checkpoint": ctx.checkpoint(name)}  # fmt: skip
        row = {"encoder": name}
        for kind, p in probes.items():
            classes = classes or [str(c) for c in (getattr(train, "classes", None)
                                                   or range(len(p.confusion)))]  # fmt: skip
            record[kind] = {
                "accuracy": p.accuracy, **p.choice, **p.meta, "n_train": p.n_train,
                "n_test": p.n_test, "val_scores": p.val_scores, "timings": p.timings,
                "confusion": p.confusion.tolist(),
            }  # fmt: skip
            title = f"{kind} probe: {name} on {r.data.name}, accuracy {p.accuracy:.4f}"
            png = f"confusion_{kind}.png" if len(names) == 1 else f"confusion_{kind}_{i}.png"
            plot_confusion(p.confusion, out / png, title, classes=classes)
            if kind == "linear":
                row.update(backend=p.meta["backend"], linear=p.accuracy, C=p.choice["C"])
            else:
                row.update(knn=p.accuracy, k=p.choice["k"])
        records.append(record)
        rows.append(row)
        accuracy[name] = {kind: p.accuracy for kind, p in probes.items()}
    write_json(out / "probe.json", {"data": r.data.name, "classes": classes,
                                    "preprocessing": ctx.preprocessing(),
                                    "n_train": len(train), "n_test": len(test),
                                    "encoders": records})  # fmt: skip
    write_table(out / "probe", rows)
    return ProbeAccuracies(accuracy)


def headlines(p: ProbeAccuracies) -> list[str]:
    parts = [f"{name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in vals.items())
             for name, vals in p.accuracy.items()]  # fmt: skip
    return ["Probe accuracy on the test split: " + "; ".join(parts) + "."]


def values(p: ProbeAccuracies) -> dict[str, float]:
    return {f"{kind} probe, {name}": acc for name, vals in p.accuracy.items()
            for kind, acc in vals.items()}  # fmt: skip


STAGE = Stage(
    "evaluate",
    ProbeAccuracies,
    run,
    enabled=lambda recipe: recipe.evaluation.linear or recipe.evaluation.knn,
    headlines=headlines,
    values=values,
    tables=(("probe.md", "Probes (test accuracy)"),),
    printed="probe.md",
)
