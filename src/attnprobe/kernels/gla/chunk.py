"""The fast forms of gated linear attention (per-channel or scalar decay), in torch.

Every product of decays is taken as exp(G_t - G_s) with G the cumulative log gate and s <= t, so no
factor exceeds 1 (no overflow, whatever the gates). Across blocks the decay factors through the
block's last position e: exp(G_t - G_s) = exp(G_t - G_e) exp(G_e - G_s), a plain matmul; only the
block on the diagonal needs the (rows x block x d) tensor. Normalization rides along as an extra
value column of ones (the state is then d x (d_v + 1)), so one code path serves both.
"""
from __future__ import annotations

import torch

BLOCK = 16  # keys per block on the diagonal (its (R, BLOCK, d) decay tensor bounds the memory)


def blocked_weights(q, k, log_alpha, rows: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Unnormalized A (B, H, R, S) of queries at positions `rows` over keys 0..S-1, exactly. log_alpha is
    (B, H, T, d) per channel, or (B, H, T, 1): one gate per head and token, whose decay is one (R x S) matrix."""
    rows = rows.to(q.device)
    if log_alpha.shape[-1] == 1:
        total = log_alpha[..., 0].cumsum(dim=2)
        visible = torch.arange(k.shape[2], device=q.device)[None, :] <= rows[:, None]
        log_decay = (total[:, :, rows, None] - total[:, :, None, :]).masked_fill(~visible, float("-inf"))
        return (q @ k.transpose(-1, -2)) * torch.exp(log_decay)
    total = log_alpha.cumsum(dim=2)
    total_q = total[:, :, rows]
    n_keys = k.shape[2]
    parts = []
    for start in range(0, n_keys, block):
        stop = min(n_keys, start + block)
        last = total[:, :, stop - 1:stop]
        past = (rows >= stop - 1)[:, None]  # queries at or after the block's last key
        k_block = k[:, :, start:stop] * torch.exp(last - total[:, :, start:stop])
        q_past = q * torch.exp((total_q - last).clamp(max=0))  # clamped rows are masked below
        weights = torch.where(past, q_past @ k_block.transpose(-1, -2), 0.0)
        inside = (rows >= start) & (rows < stop - 1)
        if bool(inside.any()):
            index = inside.nonzero().squeeze(-1)
            keys = torch.arange(start, stop, device=q.device)
            visible = (keys[None, :] <= rows[index][:, None])[..., None]
            log_decay = (total_q[:, :, index, None] - total[:, :, None, start:stop]).masked_fill(~visible, float("-inf"))
            diagonal = torch.einsum("bhrc,bhsc,bhrsc->bhrs", q[:, :, index], k[:, :, start:stop], torch.exp(log_decay))
            weights = weights.index_add(2, index, diagonal)
        parts.append(weights)
    return torch.cat(parts, dim=-1)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def chunked(q, k, v, log_alpha, state: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, H, T, d_v) and the final state (B, H, d, d_v), continuing from `state` (None: zeros)."""
    if state is None:
        state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    outputs = []
    for start in range(0, q.shape[2], chunk):
        part = slice(start, start + chunk)
        qc, kc, vc, gc = q[:, :, part], k[:, :, part], v[:, :, part], log_alpha[:, :, part]
        total = gc.cumsum(dim=2)  # within the chunk, from its start
        inter = (qc * torch.exp(total)) @ state
        intra = blocked_weights(qc, kc, gc, torch.arange(qc.shape[2], device=q.device)) @ vc
        outputs.append(inter + intra)
        last = total[:, :, -1:]
        state = torch.exp(last).transpose(-1, -2) * state + (kc * torch.exp(last - total)).transpose(-1, -2) @ vc
    return torch.cat(outputs, dim=2), state


def step(q, k, v, log_alpha, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token, (B, H, 1, .) each: (o (B, H, 1, d_v), new state)."""
    state = torch.exp(log_alpha[:, :, 0, :, None]) * state + k[:, :, 0, :, None] * v[:, :, 0, None, :]
    return q @ state, state


def _in_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, H, T, e) -> (B, H, N, chunk, e), zero-padded at the end: padded keys and values add nothing, and a
    padded log gate of 0 leaves the state as it was."""
    pad = -x.shape[2] % chunk
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.unflatten(2, (-1, chunk))


def scalar_chunked(q, k, v, log_alpha, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked` for one gate per head and token (log alpha (B, H, T, 1)) from a zero state, every chunk at once:
    within a chunk one masked (chunk x chunk) product; across chunks the state entering chunk n is
    sum_{m < n} exp(L_{n-1} - L_m) K_m^T (decayed V_m), one (N x N) decay-weighted sum of the chunks' own
    contributions (L the cumulative log gate at each chunk's end). No loop over chunks: the whole sequence is a
    few batched products, forward and backward (what training at 2K-8K tokens runs where fla's backward does not)."""
    length = q.shape[2]
    qc, kc, vc = (_in_chunks(x, chunk) for x in (q, k, v))
    total = _in_chunks(log_alpha, chunk)[..., 0].cumsum(dim=-1)  # (B, H, N, C), from each chunk's start
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((total[..., :, None] - total[..., None, :]).masked_fill(~causal, float("-inf")))
    intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
    last = total[..., -1]  # (B, H, N): each chunk's whole log decay
    contributions = (kc * torch.exp(last[..., None] - total)[..., None]).transpose(-1, -2) @ vc  # (B, H, N, d, d_v)
    ends = last.cumsum(dim=-1)  # L_n
    earlier = torch.ones(ends.shape[-1], ends.shape[-1], dtype=torch.bool, device=q.device).tril(-1)
    carry = torch.exp(((ends - last)[..., :, None] - ends[..., None, :]).masked_fill(~earlier, float("-inf")))
    states = torch.einsum("bhnm,bhmde->bhnde", carry, contributions)  # entering each chunk
    o = intra + (qc * torch.exp(total)[..., None]) @ states
    final = torch.einsum("bhm,bhmde->bhde", torch.exp(ends[..., -1:] - ends), contributions)
    return o.flatten(2, 3)[:, :, :length], final
