"""Reducers turn a site's tensor into the small statistic a probe needs, inside the hook.

A reducer sees every call of its site during a run (prefill, then each decode step). Attention
patterns arrive in chunks of query rows (`rows` gives their absolute query positions), so no run
ever holds a T x T matrix for every layer; a backend that has the whole pattern sends one chunk. A
chunk may cover only the keys its queries can see: its last axis then starts at key `key_offset`
(every key outside it has weight 0).
"""
from __future__ import annotations

from typing import Callable

import torch


class Reducer:
    """Base class: `update` is called inside the hook, `result` after the run."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def fired(self) -> bool:
        return self.calls > 0

    def update(self, x: torch.Tensor, rows: torch.Tensor | None = None, key_offset: int = 0, n_keys: int | None = None) -> None:
        self.calls += 1
        if key_offset or (n_keys is not None and n_keys != x.shape[-1]):
            x = self._widen(x, key_offset, n_keys)
        self._update(x, rows)

    @staticmethod
    def _widen(x: torch.Tensor, key_offset: int, n_keys: int | None) -> torch.Tensor:
        full = x.new_zeros(*x.shape[:-1], n_keys if n_keys is not None else key_offset + x.shape[-1])
        full[..., key_offset:key_offset + x.shape[-1]] = x
        return full

    def _update(self, x: torch.Tensor, rows: torch.Tensor | None) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class Keep(Reducer):
    """Keep the tensor of each call (pattern chunks are joined along the query axis).

    Kept in fp32 on the CPU unless `on_device` (e.g. a teacher pass that a GPU fit will use)."""

    def __init__(self, on_device: bool = False) -> None:
        super().__init__()
        self.on_device = on_device
        self.parts: list[torch.Tensor] = []
        self.row_parts: list[torch.Tensor] = []

    def _update(self, x, rows):
        kept = x.detach().float()
        self.parts.append(kept.clone() if self.on_device else kept.cpu().clone())
        if rows is not None:
            self.row_parts.append(rows.cpu())

    def result(self) -> torch.Tensor:
        if not self.parts:
            raise RuntimeError("Keep reducer never fired")
        if self.row_parts:  # a pattern: put rows back in order
            rows = torch.cat(self.row_parts)
            joined = torch.cat(self.parts, dim=-2)
            return joined[..., torch.argsort(rows), :]
        return self.parts[0] if len(self.parts) == 1 else self.parts


class Apply(Reducer):
    """Apply `fn` to each call's tensor and keep the (small) outputs in a list."""

    def __init__(self, fn: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.fn = fn
        self.values: list = []

    def _update(self, x, rows):
        self.values.append(self.fn(x.detach()))

    def result(self) -> list:
        return self.values


class PatternStats(Reducer):
    """Streaming statistics of one layer's attention pattern, for every query head.

    Accumulated over the prefill call (decode-step calls update only `last_row_argmax`):
      column_sum[b, h, k]   sum over queries of A[i, k]   (alpha_k = column_sum / queries that see k)
      diagonal[off][b, h]   mean over i >= off of A[i, i - off]
      last_row_argmax       per call, argmax key of the last query row, shape (B, H)
    `diagonal_start` restricts the diagonal mean to queries at or after that position.
    """

    def __init__(self, diagonals: tuple[int, ...] = (), diagonal_start: int = 0, track_argmax: bool = False) -> None:
        super().__init__()
        self.diagonals = tuple(diagonals)
        self.diagonal_start = diagonal_start
        self.track_argmax = track_argmax
        self.column_sum: torch.Tensor | None = None
        self._diag_sum = {off: None for off in self.diagonals}
        self._diag_count = {off: 0 for off in self.diagonals}
        self.argmax_steps: list[torch.Tensor] = []
        self.n_keys = 0

    def update(self, x, rows=None, key_offset: int = 0, n_keys: int | None = None):
        self.calls += 1  # works on the visible keys directly: no widening to all keys
        self._update(x, rows, key_offset, n_keys if n_keys is not None else key_offset + x.shape[-1])

    def _update(self, x, rows, key_offset=0, n_keys=None):
        x = x.float()
        batch, heads, n_rows, width = x.shape
        n_keys = n_keys if n_keys is not None else width
        if rows is None:
            rows = torch.arange(n_keys - n_rows, n_keys, device=x.device)
        rows = rows.to(x.device)
        if self.track_argmax and int(rows.max()) == n_keys - 1:
            self.argmax_steps.append((x[:, :, int(torch.argmax(rows)), :].argmax(dim=-1) + key_offset).cpu())
        if n_rows == 1 and n_keys > 1 and self.column_sum is not None:
            return  # a decode step: the prefill statistics are already complete
        self.n_keys = max(self.n_keys, n_keys)
        if self.column_sum is None or self.column_sum.shape[-1] != n_keys:
            self.column_sum = torch.zeros(batch, heads, n_keys, device="cpu")
        self.column_sum[..., key_offset:key_offset + width] += x.sum(dim=2).cpu()
        for off in self.diagonals:
            keep = (rows >= max(off, self.diagonal_start)) & (rows - off >= key_offset)
            if not bool(keep.any()):
                continue
            columns = (rows - off - key_offset).clamp(min=0, max=width - 1)
            values = x.gather(-1, columns.view(1, 1, -1, 1).expand(batch, heads, -1, 1)).squeeze(-1)
            total = (values * keep).sum(dim=-1).cpu()
            self._diag_sum[off] = total if self._diag_sum[off] is None else self._diag_sum[off] + total
            self._diag_count[off] += int(keep.sum())

    def update_from_stats(self, column_sum: torch.Tensor | None, entries: dict[int, torch.Tensor],
                          first_position: int, n_keys: int, last_row_argmax: torch.Tensor | None) -> None:
        """The same accumulation from statistics computed without the pattern (the Triton path).

        column_sum (B, H, n_keys) over this call's queries (None on a decode step); entries[off]
        (B, H, T) = A[i, i - off] for the call's queries at positions first_position.. (0 where unseen);
        last_row_argmax (B, H) for the query at position n_keys - 1."""
        self.calls += 1
        if self.track_argmax and last_row_argmax is not None:
            self.argmax_steps.append(last_row_argmax.cpu())
        if column_sum is None:
            return
        self.n_keys = max(self.n_keys, n_keys)
        if self.column_sum is None or self.column_sum.shape[-1] != n_keys:
            self.column_sum = torch.zeros(*column_sum.shape[:2], n_keys, device="cpu")
        self.column_sum += column_sum.float().cpu()
        for off in self.diagonals:
            first = max(off, self.diagonal_start) - first_position  # first query index that counts
            values = entries[off][..., max(first, 0):]
            if values.shape[-1] == 0:
                continue
            total = values.float().sum(dim=-1).cpu()
            self._diag_sum[off] = total if self._diag_sum[off] is None else self._diag_sum[off] + total
            self._diag_count[off] += values.shape[-1]

    def alpha(self, window: int | None = None) -> torch.Tensor:
        """alpha_k: mean attention key k receives from the queries that can see it, (B, H, S).

        Key k (0-based) is seen by T - k queries, or by at most `window` of them in a sliding layer."""
        n = self.column_sum.shape[-1]
        seen_by = torch.arange(n, 0, -1, dtype=torch.float32)
        if window is not None:
            seen_by = seen_by.clamp(max=window)
        return self.column_sum / seen_by

    def diagonal(self, off: int) -> torch.Tensor:
        if self._diag_count[off] == 0:
            raise RuntimeError(f"no query reached diagonal offset {off}")
        return self._diag_sum[off] / self._diag_count[off]

    def result(self) -> dict:
        return {"alpha": self.alpha(), **{f"diag_{off}": self.diagonal(off) for off in self.diagonals},
                "argmax": self.argmax_steps}
