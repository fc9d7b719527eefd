"""Sparse attention: exact softmax over the keys a rule keeps for each query (references in naive.py).

    oracle-topk      each query's top-k keys by score, plus the first `sinks` (the upper bound of any selector)
    quest            decode steps keep the top pages by a per-page min/max bound of q . k; prefill is dense (Quest)
    vertical-slash   prefill keeps the columns and diagonals the last queries attend most; decode is dense (MInference)
    power            a static pattern: blocks at distance 0 and 2^k, plus sinks and a local window (PowerAttention)

`keep_rows(q, k, scaling, rows, decode, context)` is each rule's key selection: a (B, H, R, S) mask
for queries q (B, H, R, d) at positions `rows` over keys k (B, H, S, d). The prefill runs in chunks of
queries, so memory is O(chunk x T); decoding scores the cache it keeps (`cached_tokens` is None: these
rules read fewer keys, they do not store fewer). `context(q, k, scaling)` is what a rule derives from
the whole prefill before any chunk (vertical-slash's pattern), None for the others.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Kernel, allowed_keys, as_fp32


@dataclass
class SparseState:
    k: torch.Tensor  # (B, KV heads, S, d): the whole cache (`Kernel.stored`)
    v: torch.Tensor


def masked_softmax(q, k, v, scaling, keep) -> torch.Tensor:
    scores = ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that keeps nothing gives z = 0
    return weights @ v


class SparseKernel(Kernel):
    cached_tokens = None
    dense_layers = 0  # a model's first layers that the rule's method leaves dense (whoever builds the rows keeps them exact)

    def options(self):
        return {"chunk": self.chunk}

    def context(self, q, k, scaling, rows=None):
        return None

    def keep_rows(self, q, k, scaling, rows, decode=False, context=None) -> torch.Tensor:
        raise NotImplementedError

    def _visible(self, q, k, rows):
        return allowed_keys(rows.to(q.device), k.shape[2]).expand(*q.shape[:2], -1, -1)

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        rows = rows.to(q.device)
        keep = self.keep_rows(q, k, scaling, rows, context=self.context(q, k, scaling, rows))
        scores = ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def quadratic(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        rows = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=q.device)
        keep = self.keep_rows(q, k, scaling, rows, context=self.context(q, k, scaling))
        return masked_softmax(q, k, v, scaling, keep).to(dtype)

    def prefill(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        length = q.shape[2]
        context = self.context(q, k, scaling)
        outputs = []
        for start in range(0, length, self.chunk):
            stop = min(length, start + self.chunk)
            rows = torch.arange(start, stop, device=q.device)
            keep = self.keep_rows(q[:, :, start:stop], k[:, :, :stop], scaling, rows, context=context)
            outputs.append(masked_softmax(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], scaling, keep))
        return torch.cat(outputs, dim=2).to(dtype), SparseState(self.stored(k), self.stored(v))

    def step(self, state, q, k, v, scaling):
        state = SparseState(torch.cat([state.k, self.stored(k)], dim=2), torch.cat([state.v, self.stored(v)], dim=2))
        keys, values = self.per_head(state.k), self.per_head(state.v)
        rows = torch.tensor([keys.shape[2] - 1], device=q.device)
        keep = self.keep_rows(q, keys, scaling, rows, decode=True)
        return masked_softmax(q, keys, values, scaling, keep), state


class OracleTopK(SparseKernel):
    """Each query keeps the first `sinks` keys and its `k` highest-scoring other visible keys."""

    name = "oracle-topk"

    def __init__(self, n_heads, head_dim, k: int = 256, sinks: int = 4, chunk: int = 64):
        super().__init__(n_heads, head_dim, chunk)
        self.k, self.sinks = k, sinks

    def options(self):
        return {"k": self.k, "sinks": self.sinks, "chunk": self.chunk}

    def keep_rows(self, q, k, scaling, rows, decode=False, context=None):
        visible = self._visible(q, k, rows)
        scores = ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~visible, float("-inf"))
        sink = torch.arange(k.shape[2], device=q.device) < self.sinks
        scores = torch.where(sink & visible, float("inf"), scores)
        chosen = scores.topk(min(self.k + self.sinks, k.shape[2]), dim=-1).indices
        return torch.zeros_like(visible).scatter(-1, chosen, True) & visible


class Quest(SparseKernel):
    """Decode steps keep every key of the `pages` pages (of `page` keys) with the highest upper bound.

    Quest's reference leaves the first two layers dense (their attention is not sparse enough for the
    bound to choose well), so a model-wide Quest row keeps layers 0-1 exact (`dense_layers`)."""

    name = "quest"
    dense_layers = 2

    def __init__(self, n_heads, head_dim, page: int = 16, pages: int = 16, chunk: int = 64):
        super().__init__(n_heads, head_dim, chunk)
        self.page, self.pages = page, pages

    def options(self):
        return {"page": self.page, "pages": self.pages, "chunk": self.chunk}

    def keep_rows(self, q, k, scaling, rows, decode=False, context=None):
        visible = self._visible(q, k, rows)
        if not decode:
            return visible
        masks = []
        for r, row in enumerate(rows.tolist()):  # decode: each query over its own cache of keys 0..row
            n = row + 1
            n_pages = -(-n // self.page)
            pad = n_pages * self.page - n
            keys = k[:, :, :n]
            low = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf")).unflatten(2, (n_pages, self.page)).amin(3)
            high = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf")).unflatten(2, (n_pages, self.page)).amax(3)
            q_r = q[:, :, r:r + 1]
            bound = torch.maximum(q_r * low, q_r * high).sum(-1)  # (B, H, pages)
            chosen = bound.topk(min(self.pages, n_pages), dim=-1).indices
            pages = torch.zeros_like(bound, dtype=torch.bool).scatter(-1, chosen, True)
            page_of = torch.arange(k.shape[2], device=q.device) // self.page
            masks.append(pages[..., page_of.clamp(max=n_pages - 1)] & visible[:, :, r])
        return torch.stack(masks, dim=2)


class VerticalSlash(SparseKernel):
    """Prefill keeps the top `vertical` key columns and `slash` diagonals by the attention of the last
    `last` queries, with the first `sinks` columns and the `local` nearest diagonals forced in."""

    name = "vertical-slash"

    def __init__(self, n_heads, head_dim, vertical: int = 128, slash: int = 128, last: int = 64, sinks: int = 4,
                 local: int = 64, chunk: int = 64):
        super().__init__(n_heads, head_dim, chunk)
        self.vertical, self.slash, self.last, self.sinks, self.local = vertical, slash, last, sinks, local

    def options(self):
        return {"vertical": self.vertical, "slash": self.slash, "last": self.last, "sinks": self.sinks,
                "local": self.local, "chunk": self.chunk}

    def context(self, q, k, scaling, rows=None):
        """(columns, diagonals) masks (B, H, S) from the last `last` of the queries q at `rows` (default:
        the last positions, a prefill's own queries). An effective-attention read in chunks gets each
        chunk's own pattern: exact for a read of the whole prompt, as in a prefill."""
        n = k.shape[2]
        last = min(self.last, q.shape[2])
        rows = torch.arange(n - q.shape[2], n, device=q.device) if rows is None else rows.to(q.device)
        rows = rows[-last:]
        visible = allowed_keys(rows, n)
        scores = ((q[:, :, -last:] @ k.transpose(-1, -2)) * scaling).masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        column = weights.sum(dim=2)
        offsets = (rows[:, None] - torch.arange(n, device=q.device)[None, :]).clamp(min=0)
        diagonal = torch.zeros_like(column).scatter_add(-1, offsets.flatten().expand(*column.shape[:2], -1),
                                                        (weights * visible).flatten(2))
        column[..., :min(self.sinks, self.vertical, n)] = float("inf")
        diagonal[..., :min(self.local, self.slash, n)] = float("inf")
        columns = torch.zeros_like(column, dtype=torch.bool).scatter(-1, column.topk(min(self.vertical, n), dim=-1).indices, True)
        diagonals = torch.zeros_like(column, dtype=torch.bool).scatter(-1, diagonal.topk(min(self.slash, n), dim=-1).indices, True)
        return columns, diagonals

    def keep_rows(self, q, k, scaling, rows, decode=False, context=None):
        visible = self._visible(q, k, rows)
        if decode:
            return visible
        columns, diagonals = context if context is not None else self.context(q, k, scaling)
        n = k.shape[2]
        columns = columns[..., :n]
        offsets = (rows[:, None].to(q.device) - torch.arange(n, device=q.device)[None, :]).clamp(min=0, max=diagonals.shape[-1] - 1)
        return visible & (columns[..., None, :] | diagonals[..., offsets])


class PowerAttention(SparseKernel):
    """A static pattern: the query's block keeps the blocks at distance 0 and 2^k, the first `sinks`
    tokens and the last `window` tokens."""

    name = "power"

    def __init__(self, n_heads, head_dim, block: int = 16, window: int = 64, sinks: int = 4, chunk: int = 64):
        super().__init__(n_heads, head_dim, chunk)
        self.block, self.window, self.sinks = block, window, sinks

    def options(self):
        return {"block": self.block, "window": self.window, "sinks": self.sinks, "chunk": self.chunk}

    def keep_rows(self, q, k, scaling, rows, decode=False, context=None):
        rows = rows.to(q.device)
        keys = torch.arange(k.shape[2], device=q.device)
        distance = rows[:, None] // self.block - keys[None, :] // self.block
        power = (distance > 0) & ((distance & (distance - 1)) == 0)
        static = (keys[None, :] < self.sinks) | ((rows[:, None] - keys[None, :]) < self.window) | (distance == 0) | power
        return self._visible(q, k, rows) & static
