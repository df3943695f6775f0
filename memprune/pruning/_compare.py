"""Every pruning strategy, ratio and schedule side by side, with and without recovery, over
seeds: the accuracy-cost table, its Pareto fronts, and what it says (docs/method.md §9b)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from memprune._table import difference_se
from memprune.encoders import input_size
from memprune.errors import ConfigError
from memprune.pruning._export import export_encoder, exported_module
from memprune.pruning._prune import check_options, measure_latency, prune
from memprune.pruning._save import _structure, save_pruned

#: The costs a Pareto front is drawn against: row key -> label.
COSTS = {"params": "parameters", "macs": "MACs", "latency_ms": "latency"}
NONE = "none"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cost_row(reports, exported: list[float], base: dict) -> dict:
    """Costs of one setting: means over its pruned models (equal widths in ``layer`` scope),
    and their ratios to the unpruned row ``base``."""
    row = {"params": round(statistics.fmean(r.params[1] for r in reports))}
    row["params_ratio"] = row["params"] / base["params"]
    row["macs"] = round(statistics.fmean(r.macs[1] for r in reports))
    row["macs_ratio"] = row["macs"] / base["macs"]
    if "latency_ms" in base:
        row["latency_ms"] = 1e3 * statistics.fmean(r.latency_s[1] for r in reports)
        row["latency_ratio"] = row["latency_ms"] / base["latency_ms"]
    if exported:
        row["latency_export_ms"] = 1e3 * statistics.fmean(exported)
    return row


def mark_pareto(rows: list[dict], key: str = "accuracy") -> list[dict]:
    """Set each row's ``pareto`` to the costs (of :data:`COSTS` the rows have) against which
    it is Pareto-optimal: no other row costs at most as much with at least its ``key``, one of
    the two strictly."""
    costs = [c for c in COSTS if all(c in r for r in rows)]
    for r in rows:
        front = []
        for c in costs:
            beaten = any(
                o[c] <= r[c] and o[key] >= r[key] and (o[c] < r[c] or o[key] > r[key]) for o in rows
            )
            if not beaten:
                front.append(c)
        r["pareto"] = ",".join(front)
    return rows


def compare_pruning(
    encoder: nn.Module,
    scores,
    evaluate: Callable[[nn.Module], float],
    ratios,
    strategies,
    models_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    log=print,
    *,
    recover: Callable[[nn.Module, int], nn.Module] | None = None,
    seeds: Sequence[int] = (0,),
    steps: Sequence[int] = (1,),
    export: bool = False,
    onnx: bool = False,
    latency_batch: int | None = 64,
    latency_time: float = 0.5,
    outcomes: dict | None = None,
    **options,
) -> tuple[list[dict], list[dict]]:
    """Prune ``encoder`` by each strategy at each ratio and schedule (``options``: arguments
    of :func:`prune`), score each pruned encoder with ``evaluate(model) -> accuracy`` (e.g. a
    linear probe retrained on its features), and, with ``recover(model, seed) -> model``
    (:func:`recovery`), score it again after recovery.

    Randomness enters through ``random`` pruning and through recovery: those run once per
    seed of ``seeds``; a deterministic pruning without recovery runs once. ``steps`` are
    numbers of pruning steps (``1``: one shot; ``N``: ``steps=N`` with the recovery between
    steps, when there is one, and ``rescore`` from ``options``); every schedule reaches the
    same final widths. Pruned (and recovered) encoders are saved under ``models_dir``; with
    ``export`` each pruned one is also exported there (:func:`export_encoder`, ``onnx`` too)
    and its exported program's latency measured (``latency_export_ms``). Latency: batches of
    ``latency_batch`` (None: not measured), ``latency_time`` seconds each, once per distinct
    architecture. ``evaluate`` may return a :class:`memprune.probe.ProbeResult` instead of a
    float; ``outcomes`` (a dict) then receives each one by encoder name (``unpruned``, and the
    names under ``models_dir``), for what each pruned encoder forgets example by example
    (:func:`memprune.probe.flips`).

    Returns table rows, one per (strategy, ratio, steps, recovery), the unpruned encoder
    first (strategy ``none``), with the accuracy's mean, ``std`` over seeds and ``seeds``, the
    costs (means over seeds) and ``pareto`` (:func:`mark_pareto`); and one record per
    evaluated encoder (its :class:`PruneResult`, seed and accuracy).
    """
    keys = ("scope", "max_layer_ratio", "rescore", "gradients")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one, got {list(seeds)}")
    if export and models_dir is None:
        raise ConfigError("export=True writes beside the saved encoders: pass models_dir")
    if recover is not None and not callable(recover):
        raise ConfigError("recover must be a callable (model, seed) -> model: see recovery_fn()")
    for strategy in strategies:  # the whole sweep is validated before any work
        for ratio in ratios:
            for n in steps:
                check_options(ratio, strategy, steps=n, scores=scores,
                              **{k: options[k] for k in keys if k in options})  # fmt: skip
    sweep = _Sweep(encoder, scores, evaluate, recover, options, models_dir=models_dir,
                   overwrite=overwrite, log=log, export={"onnx": onnx} if export else None,
                   latency_batch=latency_batch, latency_time=latency_time,
                   outcomes=outcomes)  # fmt: skip
    rows = []
    for strategy in strategies:
        for ratio in ratios:
            for n in steps:
                setting = dict(strategy=strategy, ratio=float(ratio), steps=n)
                before, after, reports, exported = sweep.run(setting, seeds)
                if not rows:  # the unpruned encoder, measured once
                    rows.append(sweep.unpruned(reports[0]))
                cost = _cost_row(reports, exported, rows[0])
                for label, accs in ((NONE, before), (sweep.method, after)):
                    if accs:
                        mean, std = _mean_std(accs)
                        rows.append({**setting, "recovery": label, **cost, "accuracy": mean,
                                     "std": std, "seeds": len(accs)})  # fmt: skip
    return mark_pareto(rows), sweep.runs


#: The unpruned encoder's name in ``outcomes``.
NONE_NAME = "unpruned"


class _Sweep:
    """Runs one setting of the sweep, saving, timing and evaluating each encoder it makes.

    Latency is measured here, once per distinct architecture: at one ratio every layer-scope
    criterion gives the same widths, so they share one timing instead of differing by noise.
    """

    def __init__(self, encoder, scores, evaluate, recover, options, *, models_dir, overwrite,
                 log, export, latency_batch, latency_time, outcomes=None):  # fmt: skip
        self.encoder, self.scores, self._evaluate = encoder, scores, evaluate
        self.outcomes = outcomes
        self.recover, self.options = recover, options
        self.method = getattr(recover, "method", "recovered") if recover is not None else None
        self.models_dir, self.overwrite, self.log = models_dir, overwrite, log
        self.export, self.batch, self.time = export, latency_batch, latency_time
        self.runs: list[dict] = []
        self.latency: dict[str, float] = {}

    def evaluate(self, model: nn.Module, name: str) -> float:
        """``evaluate(model)``'s accuracy; a probe result is kept in ``outcomes``."""
        result = self._evaluate(model)
        if self.outcomes is not None and hasattr(result, "predictions"):
            self.outcomes[name] = result
        return float(getattr(result, "accuracy", result))

    def _time(self, model: nn.Module, like: nn.Module) -> float:
        """Seconds of ``model`` on a seeded batch shaped for ``like``."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.batch, *input_size(like), generator=g)
        return measure_latency(model, x.to(next(like.parameters()).device), self.time)

    def _latency(self, model: nn.Module) -> float:
        key = json.dumps(_structure(model), sort_keys=True)
        if key not in self.latency:
            self.latency[key] = self._time(model, model)
        return self.latency[key]

    def run(self, setting: dict, seeds) -> tuple[list[float], list[float], list, list[float]]:
        """Accuracies before and after recovery, the pruning reports and the exported
        programs' latencies of one setting."""
        strategy, steps = setting["strategy"], setting["steps"]
        per_seed = strategy == "random" or (self.recover is not None and steps > 1)
        many = len(seeds) > 1  # a seed suffix only where seeds differ
        before, after, reports, exported = [], [], [], []
        for seed in seeds if per_seed else seeds[:1]:
            pruned, report = prune(self.encoder, self.scores, setting["ratio"], strategy,
                                   seed=seed, steps=steps, latency_batch=None,
                                   between_steps=self._between(steps, seed),
                                   **self.options)  # fmt: skip
            if self.batch:
                report.latency_s = (self._latency(self.encoder), self._latency(pruned))
                report.batch_size = self.batch
            name = f"{strategy}_{setting['ratio']:g}" + (f"_x{steps}" if steps > 1 else "")
            name += f"_s{seed}" if per_seed and many else ""
            before.append(self._score(pruned, name, setting, NONE, seed, report))
            if self.export is not None:
                exported += self._export(pruned, name)
            reports.append(report)
            if self.recover is not None:
                for s in [seed] if per_seed else seeds:
                    rec = f"{name}_{self.method}" + ("" if per_seed or not many else f"_s{s}")
                    recovered = self.recover(pruned, s)
                    after.append(self._score(recovered, rec, setting, self.method, s))
                    if self.export is not None:  # the encoder a user ships: exported too
                        self._export(recovered, rec, time=False)  # its architecture's timed
        return before, after, reports, exported

    def _between(self, steps: int, seed: int):
        if self.recover is None or steps == 1:
            return None

        def between(model: nn.Module) -> None:  # the prune-recover loop, in place
            model.load_state_dict(self.recover(model, seed).state_dict())

        return between

    def _score(self, model, name, setting, recovery, seed, report=None) -> float:
        if self.models_dir is not None:
            save_pruned(model, Path(self.models_dir) / name, overwrite=self.overwrite)
        accuracy = self.evaluate(model, name)
        record = {"model_dir": f"models/{name}", **setting, "recovery": recovery, "seed": seed,
                  "accuracy": accuracy}  # fmt: skip
        self.runs.append(record if report is None else {**record, **report.to_dict()})
        self.log(f"{name}: accuracy {accuracy:.4f}")
        return accuracy

    def _export(self, model: nn.Module, name: str, time: bool = True) -> list[float]:
        """Export beside the saved encoder; the exported program's latency (timed like the
        eager one), or nothing when latency is not measured (or ``time`` is off: a recovered
        encoder has its pruned one's architecture, timed already)."""
        where = Path(self.models_dir) / name
        info = export_encoder(model, where, **self.export)
        info.update(program=f"models/{name}/{Path(info['program']).name}",
                    onnx=info["onnx"] and f"models/{name}/{Path(info['onnx']).name}")  # fmt: skip
        self.runs[-1]["export"] = info
        if not self.batch or not time:
            return []
        info["latency_s"] = self._time(exported_module(where), model)
        return [info["latency_s"]]

    def unpruned(self, report) -> dict:
        """The unpruned encoder's row (its exported program timed too, not saved)."""
        row = {"strategy": NONE, "ratio": 0.0, "steps": 0, "recovery": NONE,
               "params": report.params[0], "params_ratio": 1.0, "macs": round(report.macs[0]),
               "macs_ratio": 1.0}  # fmt: skip
        if report.latency_s is not None:
            row.update(latency_ms=1e3 * report.latency_s[0], latency_ratio=1.0)
            if self.export is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    export_encoder(self.encoder, tmp)
                    row["latency_export_ms"] = 1e3 * self._time(exported_module(tmp), self.encoder)
        return {**row, "accuracy": self.evaluate(self.encoder, NONE_NAME), "std": 0.0, "seeds": 1}


def _label(row: dict) -> str:
    name = row["strategy"] + (f" x{row['steps']}" if row.get("steps", 1) > 1 else "")
    return name + ("" if row.get("recovery", NONE) == NONE else f" + {row['recovery']}")


def _margin(best: dict, second: dict) -> str:
    """Whether the winner's lead exceeds the seed-to-seed spread: twice the standard error of
    the difference of the two means (from the seeds where randomness enters)."""
    se = difference_se(best["std"], best["seeds"], second["std"], second["seeds"])
    lead = best["accuracy"] - second["accuracy"]
    if se is None:
        why = "; ".join(f"{r['strategy']}: {_one_encoder(r)}" for r in (best, second)
                        if r["seeds"] < 2)  # fmt: skip
        return f"not judged against a seed spread ({why})"
    verdict = "beyond" if lead > 2 * se else "within"
    return f"{verdict} the seed spread (2 SE = {200 * se:.1f} points)"


def _one_encoder(row: dict) -> str:
    """Why a setting has a single encoder: one seed of random pruning or of the recovery,
    or a deterministic criterion."""
    if row["strategy"] == "random" or row.get("recovery", NONE) != NONE:
        return "one seed"
    return "deterministic, one encoder"


def _test_noise(best: dict, second: dict, outcomes: dict | None) -> str:
    """Whether the lead exceeds the test set's own noise, from the two settings' per-example
    outcomes (``outcomes``: setting -> probe results over its seeds): McNemar's exact test
    where each has one encoder, else twice the paired standard error over test points of
    the difference of their per-example accuracy (averaged over seeds)."""
    from memprune.probe import mcnemar

    key = lambda r: (r["strategy"], r["ratio"], r.get("steps", 1), r["recovery"])  # noqa: E731
    a, b = (outcomes or {}).get(key(best)), (outcomes or {}).get(key(second))
    if not a or not b:
        return ""
    if len(a) == 1 and len(b) == 1:
        m = mcnemar(a[0], b[0])
        verdict = "beyond" if m["p"] < 0.05 else "within"
        return (
            f"; {verdict} the test set's noise (McNemar p = {m['p']:.3g}: right on"
            f" {m['a_only']} points the other gets wrong, wrong on {m['b_only']})"
        )
    ca = torch.stack([r.correct() for r in a]).double().mean(0)
    cb = torch.stack([r.correct() for r in b]).double().mean(0)
    d = ca - cb
    se = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else 0.0
    lead = float(d.mean())
    verdict = "beyond" if lead > 2 * se else "within"
    return f"; {verdict} the test set's noise (paired 2 SE = {200 * se:.1f} points)"


def prune_verdicts(rows: list[dict], tolerance: float = 0.01,
                   outcomes: dict | None = None) -> list[str]:  # fmt: skip
    """What a :func:`compare_pruning` table says, in sentences: per criterion (with and
    without recovery), the smallest encoder within ``tolerance`` of the unpruned accuracy;
    per ratio, one-shot schedule and recovery, which criterion wins, by how much over the
    runner-up, and whether that exceeds the seed spread, and with ``outcomes`` ((strategy,
    ratio, steps, recovery) -> the probe results of its seeds) the test set's noise."""
    base = next(r for r in rows if r["strategy"] == NONE)
    pruned = [r for r in rows if r["strategy"] != NONE]
    lines = []
    for label in dict.fromkeys(_label(r) for r in pruned):
        ok = [r for r in pruned if _label(r) == label and
              r["accuracy"] >= base["accuracy"] - tolerance]  # fmt: skip
        if ok:
            r = min(ok, key=lambda r: (r["params"], -r["accuracy"]))
            lines.append(
                f"{label}: removing {100 * r['ratio']:g}% of units, the most of the ratios"
                f" tried that keeps accuracy within {100 * tolerance:g}"
                f" point{'s' if tolerance != 0.01 else ''} of the unpruned"
                f" {100 * base['accuracy']:.1f}%, gives {100 * r['accuracy']:.1f}% with"
                f" {100 * r['params_ratio']:.0f}% of the parameters and"
                f" {100 * r['macs_ratio']:.0f}% of the MACs"
            )
        else:
            lines.append(
                f"{label}: every ratio tried loses more than {100 * tolerance:g}"
                f" point{'s' if tolerance != 0.01 else ''} of accuracy"
            )
    for ratio in sorted({r["ratio"] for r in pruned}):
        for rec in dict.fromkeys(r["recovery"] for r in pruned):
            at = sorted((r for r in pruned if r["ratio"] == ratio and r["recovery"] == rec
                         and r.get("steps", 1) == 1), key=lambda r: -r["accuracy"])  # fmt: skip
            if len(at) < 2:
                continue
            best, second = at[0], at[1]
            lead = 100 * (best["accuracy"] - second["accuracy"])
            rec_text = "without recovery" if rec == NONE else f"after {rec}"
            tied = [r["strategy"] for r in at if r["accuracy"] == best["accuracy"]]
            if len(tied) > 1:
                lines.append(f"{100 * ratio:g}% removed, {rec_text}: {', '.join(tied)} tie at"
                             f" {100 * best['accuracy']:.1f}%")  # fmt: skip
                continue
            lines.append(
                f"{100 * ratio:g}% removed, {rec_text}: {best['strategy']} wins with"
                f" {100 * best['accuracy']:.1f}%, {lead:.1f} points over {second['strategy']};"
                f" {_margin(best, second)}{_test_noise(best, second, outcomes)}"
            )
    return lines
