"""Readable references of the sparse rules, one query and one key at a time, as their papers define them.

Each returns the set of key positions that query position i (of keys 0..n-1, n = i + 1 in a decode
step) keeps; `sparse_attention` is exact softmax over that set. Small sizes only: the tests hold the
kernels' vectorised, chunked and decode forms equal to these.
"""
from __future__ import annotations

import math

import torch


def topk_keys(q_i: torch.Tensor, k: torch.Tensor, i: int, top: int, sinks: int) -> set[int]:
    """Oracle top-k: the first `sinks` keys plus the `top` highest-scoring other keys j <= i."""
    kept = set(range(min(sinks, i + 1)))
    others = [j for j in range(i + 1) if j not in kept]
    scores = {j: float(q_i @ k[j]) for j in others}
    return kept | set(sorted(others, key=lambda j: (-scores[j], j))[:top])


def quest_keys(q_i: torch.Tensor, k: torch.Tensor, i: int, page: int, pages: int) -> set[int]:
    """Quest (arXiv 2406.10774) at a decode step: pages of `page` cached keys, each bounded by the
    channel-wise min and max of its keys; upper bound of q . k in a page = sum_c max(q_c min_c, q_c max_c);
    keep every key of the `pages` pages with the highest bounds."""
    bounds = []
    for p in range(math.ceil((i + 1) / page)):
        keys = k[p * page:min(i + 1, (p + 1) * page)]
        low, high = keys.min(dim=0).values, keys.max(dim=0).values
        bounds.append((float(torch.maximum(q_i * low, q_i * high).sum()), p))
    chosen = [p for _, p in sorted(bounds, key=lambda b: (-b[0], b[1]))[:pages]]
    return {j for p in chosen for j in range(p * page, min(i + 1, (p + 1) * page))}


def vertical_slash_pattern(q: torch.Tensor, k: torch.Tensor, scaling: float, vertical: int, slash: int, last: int,
                           sinks: int, local: int) -> tuple[set[int], set[int]]:
    """MInference (arXiv 2407.02490): attention of the last `last` queries of a prefill of n tokens;
    a key column's score is the mass those queries give it, a diagonal's (offset i - j) the mass on it.
    The first `sinks` columns and the `local` nearest diagonals are forced in (the released code sets
    their scores to infinity); keep the top `vertical` columns and the top `slash` diagonals."""
    n = k.shape[0]
    column, diagonal = [0.0] * n, [0.0] * n
    for i in range(max(0, n - last), n):
        weights = torch.softmax(torch.stack([q[i] @ k[j] * scaling for j in range(i + 1)]), dim=0)
        for j in range(i + 1):
            column[j] += float(weights[j])
            diagonal[i - j] += float(weights[j])
    for j in range(min(sinks, vertical, n)):
        column[j] = math.inf
    for o in range(min(local, slash, n)):
        diagonal[o] = math.inf
    columns = set(sorted(range(n), key=lambda j: (-column[j], j))[:vertical])
    diagonals = set(sorted(range(n), key=lambda o: (-diagonal[o], o))[:slash])
    return columns, diagonals


def power_keys(i: int, block: int, window: int, sinks: int) -> set[int]:
    """PowerAttention (arXiv 2503.03588): the query's block attends to the blocks at distances 0 and
    2^k (k >= 0), beside the first `sinks` tokens and the last `window` tokens."""
    kept = set()
    for j in range(i + 1):
        distance = i // block - j // block
        if j < sinks or i - j < window or distance == 0 or (distance & (distance - 1)) == 0:
            kept.add(j)
    return kept


def attend(q_i: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, kept: set[int]) -> torch.Tensor:
    """Exact softmax of one query over the kept keys."""
    index = sorted(kept)
    weights = torch.softmax(torch.stack([q_i @ k[j] * scaling for j in index]), dim=0)
    return sum(w * v[j] for w, j in zip(weights, index))


def sparse_attention(rule: str, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                     decode: bool, **options) -> torch.Tensor:
    """z (T, d) of one head over T tokens: each query keeps its rule's keys among keys <= i.

    decode=True treats every query as a decode step over a cache of keys 0..i (Quest selects pages,
    MInference attends densely); decode=False treats the T tokens as one prefill."""
    pattern = None
    if rule == "vertical-slash" and not decode:
        pattern = vertical_slash_pattern(queries, keys, scaling, options["vertical"], options["slash"], options["last"],
                                         options["sinks"], options["local"])
    out = []
    for i in range(queries.shape[0]):
        if rule == "oracle-topk":
            kept = topk_keys(queries[i], keys, i, options["k"], options["sinks"])
        elif rule == "quest":
            kept = quest_keys(queries[i], keys, i, options["page"], options["pages"]) if decode else set(range(i + 1))
        elif rule == "vertical-slash":
            kept = set(range(i + 1)) if decode else {j for j in range(i + 1) if j in pattern[0] or i - j in pattern[1]}
        elif rule == "power":
            kept = power_keys(i, options["block"], options["window"], options["sinks"])
        else:
            raise ValueError(rule)
        out.append(attend(queries[i], keys, values, scaling, kept))
    return torch.stack(out)
