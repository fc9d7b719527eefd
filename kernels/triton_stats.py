"""Attention statistics on the GPU: Triton kernels for the two O(T^2) passes, O(T) memory.

  1. `_lse_kernel` (only when no lse is given): one program per query block walks the key blocks it
     may see with an online max/sum, as a flash-attention forward does without the values.
  2. `_column_sum_kernel`: one program per key block walks the query blocks that can see it (the
     loop of flash attention's dK/dV backward), so every column sum is owned by one program: no
     atomics, deterministic.
Both split their loop into blocks that need the causal mask and blocks that need none.
The O(T) statistics (first-token mass, diagonals, argmax rows) are dot products done in torch
(`attention_stats.py`). Set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnprobe.hooks.errors import AttnprobeError

from .attention_stats import AttentionStats, argmax_keys, diagonal_means, first_token_mass, reference_stats

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


@triton.jit
def _scores(q, k_ptrs, key_mask, scale_log2, PRECISION: tl.constexpr):
    """Scores of a query tile against a key tile, in base 2: (BM, BN)."""
    k = tl.load(k_ptrs, mask=key_mask[:, None], other=0.0)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2


@triton.jit
def _lse_step(q, K_head, start_n, offs_d, pos_m, S, window, scale_log2, m_i, l_i,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
              PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = _scores(q, K_head + offs_n[:, None] * D + offs_d[None, :], offs_n < S, scale_log2, PRECISION)
    if MASKED:
        allowed = (offs_n[None, :] <= pos_m[:, None]) & (offs_n[None, :] < S)
        if HAS_WINDOW:
            allowed &= (pos_m[:, None] - offs_n[None, :]) < window
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _lse_kernel(Q, K, LSE, T, S, window, scale_log2,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    pos_m = offs_m + (S - T)
    q = tl.load(Q + head * T * D + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    K_head = K + head * S * D
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    first_pos = pid_m * BLOCK_M + (S - T)
    end = tl.minimum(first_pos + BLOCK_M, S)  # one past the last key any row of the block sees
    if HAS_WINDOW:
        start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        for start_n in range(start, end, BLOCK_N):
            m_i, l_i = _lse_step(q, K_head, start_n, offs_d, pos_m, S, window, scale_log2, m_i, l_i,
                                 D, BLOCK_N, True, True, PRECISION)
    else:
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # key blocks every row sees whole
        for start_n in range(0, full_end, BLOCK_N):
            m_i, l_i = _lse_step(q, K_head, start_n, offs_d, pos_m, S, window, scale_log2, m_i, l_i,
                                 D, BLOCK_N, False, False, PRECISION)
        for start_n in range(full_end, end, BLOCK_N):
            m_i, l_i = _lse_step(q, K_head, start_n, offs_d, pos_m, S, window, scale_log2, m_i, l_i,
                                 D, BLOCK_N, True, False, PRECISION)
    # l_i >= 1 on any row with a visible key; the clamp only quiets padding rows (lse -inf, not stored)
    lse = (m_i + tl.log2(tl.maximum(l_i, 1.0))) / 1.4426950408889634
    tl.store(LSE + head * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _column_step(k, Q_head, LSE_head, start_m, offs_d, offs_n, T, S, window, scale_log2, col,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 PRECISION: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_range = offs_m < T
    # lse arrives in natural log; +inf on padding rows makes their probabilities 0
    lse2 = tl.load(LSE_head + offs_m, mask=in_range, other=float("inf")) * 1.4426950408889634
    s = _scores(k, Q_head + offs_m[:, None] * D + offs_d[None, :], in_range, scale_log2, PRECISION)  # (BN, BM)
    p = tl.exp2(s - lse2[None, :])
    if MASKED:
        pos_m = offs_m + (S - T)
        allowed = (offs_n[:, None] <= pos_m[None, :]) & in_range[None, :]
        if HAS_WINDOW:
            allowed &= (pos_m[None, :] - offs_n[:, None]) < window
        p = tl.where(allowed, p, 0.0)
    return col + tl.sum(p, axis=1)


@triton.jit
def _column_sum_kernel(Q, K, LSE, COL, T, S, window, scale_log2,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + head * S * D + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
    Q_head = Q + head * T * D
    LSE_head = LSE + head * T
    col = tl.zeros([BLOCK_N], dtype=tl.float32)
    shift = S - T  # query index = position - shift
    first = tl.maximum(pid_n * BLOCK_N - shift, 0)  # first query that sees a key of this block
    if HAS_WINDOW:
        end = tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1 + window - shift, T)
        for start_m in range(first, end, BLOCK_M):
            col = _column_step(k, Q_head, LSE_head, start_m, offs_d, offs_n, T, S, window, scale_log2, col,
                               D, BLOCK_M, True, True, PRECISION)
    else:
        # queries from `full` on see every key of the block; the blocks before straddle the diagonal
        full = tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - shift, first)
        n_masked = tl.cdiv(full - first, BLOCK_M)
        unmasked_start = first + n_masked * BLOCK_M
        tail = unmasked_start + tl.maximum(T - unmasked_start, 0) // BLOCK_M * BLOCK_M
        for start_m in range(first, unmasked_start, BLOCK_M):
            col = _column_step(k, Q_head, LSE_head, start_m, offs_d, offs_n, T, S, window, scale_log2, col,
                               D, BLOCK_M, True, False, PRECISION)
        for start_m in range(unmasked_start, tail, BLOCK_M):
            col = _column_step(k, Q_head, LSE_head, start_m, offs_d, offs_n, T, S, window, scale_log2, col,
                               D, BLOCK_M, False, False, PRECISION)
        for start_m in range(tail, T, BLOCK_M):
            col = _column_step(k, Q_head, LSE_head, start_m, offs_d, offs_n, T, S, window, scale_log2, col,
                               D, BLOCK_M, True, False, PRECISION)
    tl.store(COL + head * S + offs_n, col, mask=offs_n < S)


def _padded_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> contiguous (B*H, L, D) with D a power of two >= 16 (zero columns leave q . k as is)."""
    d = x.shape[-1]
    if d > MAX_HEAD_DIM:
        raise AttnprobeError(f"head dim {d} is above the Triton kernels' {MAX_HEAD_DIM}: pass use_triton=False")
    width = max(16, triton.next_power_of_2(d))
    if width != d:
        x = torch.nn.functional.pad(x, (0, width - d))
    return x.reshape(-1, *x.shape[-2:]).contiguous()


def _launch_config(head_dim: int) -> dict:
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def triton_lse(q: torch.Tensor, k: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
    """Row log-sum-exp (B, H, T) fp32, natural log."""
    batch, heads, n_queries, _ = q.shape
    qf, kf = _padded_heads(q), _padded_heads(k)
    lse = torch.empty(batch * heads, n_queries, device=q.device, dtype=torch.float32)
    config = _launch_config(qf.shape[-1])
    grid = (triton.cdiv(n_queries, config["BLOCK_M"]), batch * heads)
    _lse_kernel[grid](qf, kf, lse, n_queries, kf.shape[1], window or 0, scaling * LOG2E, D=qf.shape[-1],
                      HAS_WINDOW=window is not None, PRECISION=_precision(q), **config)
    return lse.view(batch, heads, n_queries)


def triton_column_sums(q, k, lse, scaling: float, window: int | None = None) -> torch.Tensor:
    """sum_i A[i, k] for every key, (B, H, S) fp32."""
    batch, heads, n_queries, _ = q.shape
    qf, kf = _padded_heads(q), _padded_heads(k)
    n_keys = kf.shape[1]
    lse = lse.float().reshape(batch * heads, n_queries).contiguous()
    col = torch.empty(batch * heads, n_keys, device=q.device, dtype=torch.float32)
    config = dict(_launch_config(qf.shape[-1]))
    config["BLOCK_M"], config["BLOCK_N"] = config["BLOCK_N"], config["BLOCK_M"]  # keys are the long side here
    grid = (triton.cdiv(n_keys, config["BLOCK_N"]), batch * heads)
    _column_sum_kernel[grid](qf, kf, lse, col, n_queries, n_keys, window or 0, scaling * LOG2E, D=qf.shape[-1],
                             HAS_WINDOW=window is not None, PRECISION=_precision(q), **config)
    return col.view(batch, heads, n_keys)


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # exact fp32 dots; half inputs ignore it


def _check(q, k, argmax_rows) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise AttnprobeError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, d) and (B, H, S, d): repeat k for GQA first")
    if q.shape[2] > k.shape[2]:
        raise AttnprobeError(f"{q.shape[2]} queries but only {k.shape[2]} keys: queries must be the last positions of the keys")
    if argmax_rows is not None:
        rows = torch.as_tensor(argmax_rows)
        low = k.shape[2] - q.shape[2]
        if rows.numel() and (int(rows.min()) < low or int(rows.max()) >= k.shape[2]):
            raise AttnprobeError(f"argmax rows must be query positions in [{low}, {k.shape[2]}); got {rows.tolist()}")


def attention_stats(q: torch.Tensor, k: torch.Tensor, scaling: float, window: int | None = None,
                    lse: torch.Tensor | None = None, diagonals=(), argmax_rows=None, diagonal_start: int = 0,
                    use_triton: bool | None = None) -> AttentionStats:
    """Statistics of causal softmax attention of q (B,H,T,d) over k (B,H,S,d), without the T x S pattern.

    `lse` (B,H,T), when given (e.g. from SDPA's flash op), skips the log-sum-exp pass. Triton runs on
    CUDA tensors or under TRITON_INTERPRET=1; elsewhere the torch reference does. `use_triton` forces either.
    """
    _check(q, k, argmax_rows)
    if use_triton is None:
        use_triton = triton_usable(q)
    if not use_triton:
        return reference_stats(q, k, scaling, window, lse, diagonals, argmax_rows, diagonal_start)
    if not triton_usable(q):
        raise AttnprobeError("Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones): move q, k to the GPU or pass use_triton=False")
    lse = triton_lse(q, k, scaling, window) if lse is None else lse.float()
    return AttentionStats(
        lse=lse,
        column_sum=triton_column_sums(q, k, lse, scaling, window),
        first_token=first_token_mass(q, k, lse, scaling, window),
        diagonal=diagonal_means(q, k, lse, scaling, diagonals, diagonal_start, window),
        argmax=None if argmax_rows is None else argmax_keys(q, k, scaling, argmax_rows, window),
    )
