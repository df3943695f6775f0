"""Weighted kNN on frozen features (Wu et al. 2018; DINO's protocol; docs/method.md §11).

Cosine similarity on L2-normalized features; the k nearest train points vote for their class
with weight ``exp(similarity / T)``, T = 0.07. ``k`` is chosen from {10, 20, 100, 200} (capped
by the train size) on a seeded stratified validation split carved from train; the test set is
scored once with the chosen k, neighbours drawn from all of train. The neighbours of every
query are found once, for the largest k; each smaller k votes with the nearest of them.

Features larger than memory: with ``chunk`` rows, the bank (the train features) is read
``chunk`` rows at a time and each chunk's nearest neighbours are merged into a running
top-k, so the features may be memory-mapped files on disk (``knn_probe(store=...)``); the
result equals the one-shot search up to ties in similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memprune.errors import ConfigError
from memprune.probe._linear import _as_tensor, check_xy
from memprune.probe._split import validation_split

DEFAULT_KS = (10, 20, 100, 200)


def nearest(bank, queries, k: int, bank_rows=None, query_rows=None, chunk: int | None = None,
            device=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Cosine similarities [Q, k] and bank positions [Q, k] (in ``bank_rows``; largest first)
    of the ``k`` nearest bank rows of every query row. ``bank_rows`` / ``query_rows``: the
    rows of ``bank`` / ``queries`` taking part (None: all); ``chunk``: rows read at a time
    (None: every row at once); ``device``: where the search runs (None: the bank's)."""
    device = bank.device if device is None else torch.device(device)
    n_bank = len(bank) if bank_rows is None else len(bank_rows)
    n_query = len(queries) if query_rows is None else len(query_rows)
    step = chunk or max(n_bank, 1)
    q_step = chunk or 1024  # queries in blocks even in memory: a [1024, N] matrix at a time

    def read(x, rows, start, size):
        where = slice(start, start + size) if rows is None else rows[start : start + size]
        return F.normalize(x[where].to(device).float(), dim=1)

    k = min(k, n_bank)
    sims, idx = [], []
    for q0 in range(0, n_query, q_step):
        q = read(queries, query_rows, q0, q_step)
        for b0 in range(0, n_bank, step):
            sim, pos = (q @ read(bank, bank_rows, b0, step).T).topk(min(k, step, n_bank - b0), 1)
            if b0 == 0:
                best_sim, best_idx = sim, pos
                continue
            both = torch.cat([best_sim, sim], 1)
            best_sim, keep = both.topk(min(k, both.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, pos + b0], 1).gather(1, keep)
        sims.append(best_sim)
        idx.append(best_idx)
    return torch.cat(sims), torch.cat(idx)


def vote(sims: torch.Tensor, labels: torch.Tensor, k: int, n_classes: int,
         temperature: float = 0.07) -> torch.Tensor:  # fmt: skip
    """Class predictions from the ``k`` nearest (``sims``, neighbour ``labels`` [Q, >= k],
    largest first), each voting ``exp(similarity / temperature)``."""
    votes = torch.zeros(len(sims), n_classes, device=sims.device)
    votes.scatter_add_(1, labels[:, :k], (sims[:, :k] / temperature).exp())
    return votes.argmax(1)


def knn_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, k: int, n_classes: int,
    temperature: float = 0.07, chunk: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Class predictions of ``x`` by temperature-weighted votes of the k nearest ``train_x``
    (``chunk``: rows read at a time, see :func:`nearest`)."""
    sims, pos = nearest(train_x, x, k, chunk=chunk)
    return vote(sims, train_y.to(pos.device)[pos], k, n_classes, temperature)


def knn_accuracy(
    train_x, train_y, test_x, test_y, ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07,
    val_fraction: float = 0.2, seed: int = 0, chunk: int | None = None, device=None,
) -> dict:  # fmt: skip
    """Test accuracy of the weighted kNN with k chosen on validation (see module docstring).
    ``chunk``: features read that many rows at a time (None: at once); ``device``: where the
    search runs (None: the features').

    Returns ``{"accuracy", "k", "val_scores", "predictions"}`` (predictions on the CPU).
    """
    train_x, test_x = _as_tensor(train_x), _as_tensor(test_x)
    train_y, test_y = _as_tensor(train_y).long().cpu(), _as_tensor(test_y).long().cpu()
    check_xy(train_x, train_y, chunk)
    check_xy(test_x, test_y, chunk)
    if train_x.shape[1] != test_x.shape[1]:
        raise ConfigError(
            f"train features have {train_x.shape[1]} dimensions, test {test_x.shape[1]}"
        )
    missing = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if missing:
        raise ConfigError(
            f"test classes {missing} never occur in train: no neighbour can vote for them"
        )
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    tr, va = validation_split(
        train_y,
        val_fraction,
        seed,
        "the kNN probe chooses k",
        "leave the kNN probe out (evaluation.knn: false; CLI --no-knn)",
    )
    tr, va = torch.as_tensor(tr), torch.as_tensor(va)
    if chunk is not None:  # a memory-mapped bank is read in order
        tr, va = tr.sort().values, va.sort().values
    candidates = sorted({min(k, len(tr)) for k in ks})
    search = dict(chunk=chunk, device=device)
    sims, pos = nearest(train_x, train_x, candidates[-1], tr, va, **search)
    labels = train_y[tr].to(pos.device)[pos]
    val_y = train_y[va].to(pos.device)
    val_scores = {
        k: float((vote(sims, labels, k, n_classes, temperature) == val_y).float().mean())
        for k in candidates
    }
    best = max(val_scores, key=lambda k: (val_scores[k], -k))
    sims, pos = nearest(train_x, test_x, min(best, len(train_x)), **search)
    pred = vote(sims, train_y.to(pos.device)[pos], best, n_classes, temperature).cpu()
    return {"accuracy": float((pred == test_y).float().mean()), "k": best,
            "val_scores": val_scores, "predictions": pred}  # fmt: skip
