"""Coverage over timm architectures: which of memprune's operations each model supports.

For every model (random weights, a small input), one column per operation:

* ``sites``: unit and layer sites found;
* ``unitmem``: UnitMem computed (4 points, 1 view);
* ``prune``: 30 % of the units removed by lowest UnitMem, parameters fewer, output width kept;
* ``heads``: attention heads pruned too (models with multi-head attention sites);
* ``save/load``: the pruned encoder saved and loaded back gives the same outputs;
* ``export``: its ``torch.export`` program equals the eager model;
* ``finetune``: one layer fine-tuned for one epoch;
* ``metapruner``: torch-pruning's own ``MetaPruner`` (magnitude, 30 %, the last module
  ignored) runs and keeps the output width: the baseline memprune is measured against.

A cell is ``ok``, ``-`` (does not apply), ``refused`` (a ``MemPruneError``: a clear message
saying what is not supported), ``CRASH`` (any other exception: a bug) or ``timeout`` (over
90 s). The table and the
counts per column are printed; ``--markdown FILE`` also writes them. Slow: several minutes on
2 CPU cores for the whole list; ``--models`` takes a subset.

    python benchmarks/coverage.py
    python benchmarks/coverage.py --models resnet18 swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import copy
import signal
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import memprune
from memprune.errors import MemPruneError

#: Model -> (input size, timm arguments): small members of each family, at a small input.
MODELS = {
    "resnet18": (64, {}), "resnet50": (64, {}), "resnext26ts": (64, {}),
    "seresnet18": (64, {}), "res2net50_14w_8s": (64, {}), "resnest14d": (64, {}),
    "regnetx_002": (64, {}), "regnety_002": (64, {}), "efficientnet_b0": (64, {}),
    "efficientnet_lite0": (64, {}), "mobilenetv2_050": (64, {}),
    "mobilenetv3_small_050": (64, {}), "mnasnet_050": (64, {}), "ghostnet_050": (64, {}),
    "mixnet_s": (64, {}), "densenet121": (64, {}), "dla34": (64, {}),
    "cspresnet50": (64, {}), "cspdarknet53": (64, {}), "convnext_atto": (64, {}),
    "convnextv2_atto": (64, {}), "repvgg_a0": (64, {}), "rexnet_100": (64, {}),
    "hrnet_w18_small": (64, {}), "inception_v3": (75, {}), "xception41": (64, {}),
    "dpn68": (64, {}), "selecsls42b": (64, {}), "ese_vovnet19b_dw": (64, {}),
    "hardcorenas_a": (64, {}), "tinynet_e": (64, {}), "lcnet_050": (64, {}),
    "mobileone_s0": (64, {}), "fastvit_t8": (64, {}), "efficientformer_l1": (224, {}),
    "convmixer_768_32": (64, {}), "poolformer_s12": (64, {}),
    "vit_tiny_patch16_224": (64, {"depth": 2}), "deit_tiny_patch16_224": (64, {"depth": 2}),
    "beit_base_patch16_224": (64, {"depth": 2, "embed_dim": 96, "num_heads": 4}),
    "cait_xxs24_224": (64, {"depth": 2}), "convit_tiny": (64, {"depth": 2}),
    "eva02_tiny_patch14_224": (56, {"depth": 2}), "xcit_nano_12_p16_224": (64, {"depth": 2}),
    "swin_tiny_patch4_window7_224": (64, {"window_size": 2, "depths": (1, 1, 1, 1),
                                          "embed_dim": 24, "num_heads": (1, 1, 2, 2)}),
    "maxvit_nano_rw_256": (64, {}), "tiny_vit_5m_224": (64, {}), "mobilevit_xxs": (64, {}),
    "pvt_v2_b0": (64, {}), "coatnet_nano_rw_224": (64, {}), "hiera_tiny_224": (64, {}),
    "levit_128s": (64, {}), "pit_ti_224": (64, {}), "efficientvit_b0": (64, {}),
    "gcvit_xxtiny": (64, {}), "twins_svt_small": (64, {"depths": (1, 1, 1, 1)}),
}  # fmt: skip
COLUMNS = ("sites", "unitmem", "prune", "heads", "save/load", "export", "finetune", "metapruner")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _cell(fn, seconds: int = 90) -> tuple[str, str]:
    """(status, detail) of one operation; one that runs past ``seconds`` is a ``timeout``."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        out = fn()
    except _Timeout:
        return "timeout", f"over {seconds} s"
    except MemPruneError as err:
        return "refused", str(err).splitlines()[0][:160]
    except Exception as err:  # a crash is what this measures
        where = traceback.extract_tb(err.__traceback__)[-1]
        return "CRASH", f"{type(err).__name__}: {str(err)[:120]} ({Path(where.filename).name})"
    finally:
        signal.alarm(0)
    if out is None:
        return "-", ""
    return "ok", out if isinstance(out, str) else ""


def _data(size: int, n: int = 8):
    from memprune.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 2,
                        "random", ["0", "1"])  # fmt: skip


def _metapruner(model, size: int):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode():
        width = model(x).shape[-1]
    last = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1:]
    pruner = tp.pruner.MetaPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.3, ignored_layers=last)  # fmt: skip
    pruner.step()
    with torch.inference_mode():
        if model(x).shape[-1] != width:
            raise RuntimeError(f"output width {width} -> {model(x).shape[-1]}")
    return True


def check(name: str, size: int, kw: dict):
    """Every column of one model, and for the pruning columns the reasons of the groups that
    were left unpruned."""
    from memprune.pruning import export_encoder, load_pruned, save_pruned
    from memprune.tuning import layer_modules

    row: dict[str, tuple[str, str]] = {}
    state: dict = {}
    data = _data(size)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))

    def build():
        state["model"] = memprune.load_encoder(name, img_size=size, **kw)
        units = memprune.find_sites(state["model"], "units")
        state["heads"] = any(s.role == "heads" for s in units)
        return bool(units and memprune.find_sites(state["model"], "layers"))

    state["heads"] = False
    row["sites"] = _cell(build)
    if "model" not in state:  # the model itself could not be built
        return {c: row.get(c, (row["sites"][0], row["sites"][1])) for c in COLUMNS}
    model = state["model"]

    def unitmem():
        state["scores"] = memprune.unit_mem(model, torch.utils.data.Subset(data, range(4)),
                                            n_views=1, progress=False)  # fmt: skip
        return True

    def pruned(heads: bool):
        def run():
            if heads and not state["heads"]:
                return None
            small, rep = memprune.prune(model, state["scores"], 0.3, "lowest", heads=heads,
                                        latency_batch=None)  # fmt: skip
            with torch.inference_mode():
                if small(x).shape != model(x).shape or rep.params[1] >= rep.params[0]:
                    raise RuntimeError(f"params {rep.params}, output {small(x).shape}")
            state[f"pruned_{heads}"] = small
            kind = "heads" if heads else "units"
            mine = [g for g in rep.groups if (g["kind"] == "heads") == heads]
            state[f"left_{heads}"] = sorted({g["blocked"].split(" (")[0] for g in mine
                                             if g["blocked"]})  # fmt: skip
            done = sum(g["pruned"] for g in mine)
            return f"{done}/{len(mine)} {kind} groups, params x{rep.params[1] / rep.params[0]:.2f}"

        return run

    def saveload():
        with tempfile.TemporaryDirectory() as d:
            save_pruned(state["pruned_False"], Path(d) / "m")
            again = load_pruned(Path(d) / "m")
        with torch.inference_mode():
            if not torch.equal(again(x), state["pruned_False"](x)):
                raise RuntimeError("loaded outputs differ")
        return True

    def export():
        with tempfile.TemporaryDirectory() as d:
            export_encoder(state["pruned_False"], Path(d) / "m")
        return True

    def tune():
        last = list(layer_modules(model, size=(3, size, size)))[-1]
        memprune.finetune(model, [last], data, data, data, epochs=1, batch_size=4,
                          progress=False)  # fmt: skip
        return True

    row["unitmem"] = _cell(unitmem)
    scored = "scores" in state
    needs = (row["unitmem"][0], f"needs UnitMem: {row['unitmem'][1]}")
    row["prune"] = _cell(pruned(False)) if scored else needs
    row["heads"] = _cell(pruned(True)) if scored else ("-", "")
    have = "pruned_False" in state
    row["save/load"] = _cell(saveload) if have else ("-", "")
    row["export"] = _cell(export) if have else ("-", "")
    row["finetune"] = _cell(tune)
    row["metapruner"] = _cell(lambda: _metapruner(model, size))
    return row, {"prune": state.get("left_False", []), "heads": state.get("left_True", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm names")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    rows, left = {}, {}
    for name in args.models:
        size, kw = MODELS.get(name, (64, {}))
        start = time.perf_counter()
        rows[name], left[name] = check(name, size, kw)
        cells = " ".join(f"{c}={rows[name][c][0]}" for c in COLUMNS)
        print(f"{name:32s} {time.perf_counter() - start:5.1f}s {cells}", flush=True)
    head = "| model | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    lines += [f"| {n} | " + " | ".join(r[c][0] for c in COLUMNS) + " |" for n, r in rows.items()]
    applies = {c: [r[c][0] for r in rows.values() if r[c][0] != "-"] for c in COLUMNS}
    lines += [
        "",
        "| column | ok | refused | crash | timeout | applies |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {c} | {v.count('ok')} | {v.count('refused')} | {v.count('CRASH')} |"
              f" {v.count('timeout')} | {len(v)} |" for c, v in applies.items()]  # fmt: skip
    notes = [f"- {n} {c}: {r[c][0]}: {r[c][1]}" for n, r in rows.items() for c in COLUMNS
             if r[c][0] in ("refused", "CRASH", "timeout")]  # fmt: skip
    details = [f"- {n} {c}: {r[c][1]}" + (f"; left unpruned: {'; '.join(left[n][c])[:300]}"
                                          if left[n][c] else "")
               for n, r in rows.items() for c in ("prune", "heads") if r[c][0] == "ok"]  # fmt: skip
    text = "\n".join([*lines, "", "Refusals and crashes:", "", *notes, "",
                      "Groups pruned (of those holding scored sites) and why others were not:",
                      "", *details, ""])  # fmt: skip
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
