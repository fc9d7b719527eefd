"""Attention statistics on the GPU: Triton kernels for the two O(T^2) passes, O(T) memory.

  1. `_lse_kernel` (only when no lse is given): one program per query block walks the key blocks it
     may see with an online max/sum, as a flash-attention forward does without the values.
  2. `_column_sum_kernel`: one program per key block walks the query blocks that can see it (the
     loop of flash attention's dK/dV backward), so every column sum is owned by one program: no
     atomics, deterministic.
Both split their loop into blocks that need the causal mask and blocks that need none.
  3. `_entries_kernel`: the O(T) statistics, A[i, key(i)] for every query and a few key rules
     key(i) = base + coef * position(i) (first token: 0 + 0 i; diagonal off: -off + 1 i), one launch.
The argmax of a few rows is a small torch product. Nothing here waits on the GPU, so the passes
queue behind the forward pass. Set TRITON_INTERPRET=1 before importing triton to run them on CPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnprobe.errors import AttnprobeError

from .attention_stats import AttentionStats, allowed_keys, reference_stats
from .dispatch import interpreting, triton_runs_on

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


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


@triton.jit
def _entries_kernel(Q, K, LSE, BASE, COEF, OUT, T, S, N_RULES, window, scale_log2,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_WINDOW: tl.constexpr):
    pid_m = tl.program_id(0)
    rule = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_range = offs_m < T
    pos = offs_m + (S - T)
    key = tl.load(BASE + rule) + tl.load(COEF + rule) * pos
    visible = in_range & (key >= 0) & (key <= pos)
    if HAS_WINDOW:
        visible &= (pos - key) < window
    q = tl.load(Q + head * T * D + offs_m[:, None] * D + offs_d[None, :], mask=in_range[:, None], other=0.0)
    k = tl.load(K + head * S * D + key[:, None].to(tl.int64) * D + offs_d[None, :], mask=visible[:, None], other=0.0)
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1) * scale_log2
    lse2 = tl.load(LSE + head * T + offs_m, mask=in_range, other=0.0) * 1.4426950408889634
    p = tl.where(visible, tl.exp2(s - lse2), 0.0)
    tl.store(OUT + (head * N_RULES + rule) * T + offs_m, p, mask=in_range)


def padded_heads(x: torch.Tensor, what: str = "head dim") -> torch.Tensor:
    """(B, H, L, d) -> contiguous (B*H, L, D) with D a power of two >= 16 (zero columns leave every dot product as is)."""
    d = x.shape[-1]
    if d > MAX_HEAD_DIM:
        raise AttnprobeError(f"{what} {d} is above the Triton kernels' {MAX_HEAD_DIM}: use the torch path (--torch-kernels, use_triton=False)")
    width = max(16, triton.next_power_of_2(d))
    if width != d:
        x = torch.nn.functional.pad(x, (0, width - d))
    return x.reshape(-1, *x.shape[-2:]).contiguous()


def _launch_config(head_dim: int) -> dict:
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32}
    if head_dim <= 128:  # the column pass swaps them: 128 keys per program, 64 queries per step (fastest of 10 on the H100)
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def triton_lse(q: torch.Tensor, k: torch.Tensor, scaling: float, window: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """Row log-sum-exp (B, H, T) fp32, natural log. `config` overrides the launch (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    return _lse(padded_heads(q), padded_heads(k), q.shape[:2], scaling, window, config)


def triton_column_sums(q, k, lse, scaling: float, window: int | None = None, config: dict | None = None) -> torch.Tensor:
    """sum_i A[i, k] for every key, (B, H, S) fp32. In `config`, BLOCK_N is the key block, BLOCK_M the query block."""
    return _column_sums(padded_heads(q), padded_heads(k), lse, q.shape[:2], scaling, window, config)


def triton_entries(q, k, lse, scaling: float, rules, window: int | None = None) -> torch.Tensor:
    """A[i, base + coef * position_i] for each rule (base, coef) and query i, (B, H, R, T) fp32; 0 where not visible."""
    return _entries(padded_heads(q), padded_heads(k), lse, q.shape[:2], scaling, rules, window)


def _lse(qf, kf, batch_heads, scaling, window, config=None):
    n_queries = qf.shape[1]
    lse = torch.empty(qf.shape[0], n_queries, device=qf.device, dtype=torch.float32)
    config = {**_launch_config(qf.shape[-1]), **(config or {})}
    grid = (triton.cdiv(n_queries, config["BLOCK_M"]), qf.shape[0])
    _lse_kernel[grid](qf, kf, lse, n_queries, kf.shape[1], window or 0, scaling * LOG2E, D=qf.shape[-1],
                      HAS_WINDOW=window is not None, PRECISION=_precision(qf), **config)
    return lse.view(*batch_heads, n_queries)


def _column_sums(qf, kf, lse, batch_heads, scaling, window, config=None):
    n_queries, n_keys = qf.shape[1], kf.shape[1]
    lse = lse.float().reshape(qf.shape[0], n_queries).contiguous()
    col = torch.empty(qf.shape[0], n_keys, device=qf.device, dtype=torch.float32)
    defaults = dict(_launch_config(qf.shape[-1]))
    defaults["BLOCK_M"], defaults["BLOCK_N"] = defaults["BLOCK_N"], defaults["BLOCK_M"]  # keys are the long side here
    config = {**defaults, **(config or {})}
    grid = (triton.cdiv(n_keys, config["BLOCK_N"]), qf.shape[0])
    _column_sum_kernel[grid](qf, kf, lse, col, n_queries, n_keys, window or 0, scaling * LOG2E, D=qf.shape[-1],
                             HAS_WINDOW=window is not None, PRECISION=_precision(qf), **config)
    return col.view(*batch_heads, n_keys)


@functools.lru_cache(maxsize=64)
def _rule_tensors(rules: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rules' bases and coefficients on the device, made once (a copy to the GPU would wait for it)."""
    return (torch.tensor([b for b, _ in rules], dtype=torch.int32, device=device),
            torch.tensor([c for _, c in rules], dtype=torch.int32, device=device))


def _entries(qf, kf, lse, batch_heads, scaling, rules, window):
    n_queries, n_keys = qf.shape[1], kf.shape[1]
    base, coef = _rule_tensors(tuple((int(b), int(c)) for b, c in rules), qf.device)
    lse = lse.float().reshape(qf.shape[0], n_queries).contiguous()
    out = torch.empty(qf.shape[0], len(rules), n_queries, device=qf.device, dtype=torch.float32)
    block = 32 if interpreting() else 64
    grid = (triton.cdiv(n_queries, block), len(rules), qf.shape[0])
    _entries_kernel[grid](qf, kf, lse, base, coef, out, n_queries, n_keys, len(rules), window or 0, scaling * LOG2E,
                          D=qf.shape[-1], BLOCK_M=block, HAS_WINDOW=window is not None)
    return out.view(*batch_heads, len(rules), n_queries)


_FUSED_OPS = ("cudnn", "flash")
_fused_choice: dict = {}  # (device, dtype, head dim) -> the op that works there, or None


def _fused_call(name, q, k, v, scaling):
    if name == "cudnn":  # the fastest SDPA backend on Hopper; it returns the log-sum-exp on request
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scaling)
    else:
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scaling)
    return result[0], result[1]


def sdpa_with_lse(q, k, v, scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention (B,H,T,d) and its row log-sum-exp (B,H,T) fp32, natural log, from one fused CUDA
    kernel (cuDNN's, else FlashAttention-2's) for a prefill (T queries over the same T keys; k repeated
    for GQA, v repeated here when it has fewer heads). None where neither takes these inputs. The first use on a device, dtype and head
    dim checks the kernel's log-sum-exp against `triton_lse` and keeps the first op that agrees."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[2] != k.shape[2] or q.shape[-1] > 256:
        return None
    key = (q.device, q.dtype, q.shape[-1])
    if key in _fused_choice and _fused_choice[key] is None:
        return None
    if v.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    for name in [_fused_choice[key]] if key in _fused_choice else _FUSED_OPS:
        try:
            out, lse = _fused_call(name, q, k, v, scaling)
        except RuntimeError:
            continue
        lse = lse.float().reshape(*q.shape[:2], -1)[..., :q.shape[2]]
        if key not in _fused_choice:
            if not torch.allclose(lse, triton_lse(q, k, scaling), atol=1e-3, rtol=1e-4):
                continue
            _fused_choice[key] = name
        return out, lse
    _fused_choice[key] = None
    return None


def _passes(q, k, scaling, window, lse, rules):
    """The two O(T^2) passes and the entries launch: (lse, column sums (B,H,S), entries (B,H,R,T) or None)."""
    qf, kf = padded_heads(q), padded_heads(k)
    lse = _lse(qf, kf, q.shape[:2], scaling, window) if lse is None else lse.float()
    entries = _entries(qf, kf, lse, q.shape[:2], scaling, rules, window) if rules else None
    return lse, _column_sums(qf, kf, lse, q.shape[:2], scaling, window), entries


def pattern_statistics(q, k, scaling: float, window: int | None = None, lse: torch.Tensor | None = None,
                       diagonals=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """What a streaming pattern reducer accumulates: column sums (B, H, S) and, per diagonal offset,
    the entries A[i, i - off] of every query (B, H, T). `lse` as in `attention_stats`."""
    _, column_sum, entries = _passes(q, k, scaling, window, lse, [(-off, 1) for off in diagonals])
    return column_sum, {off: entries[:, :, j] for j, off in enumerate(diagonals)}


def last_rows_argmax(q, k, scaling: float, rows, window: int | None = None) -> torch.Tensor:
    """Argmax key of query positions `rows` (Python ints), (B, H, R), with no host-device sync."""
    rows = [int(r) for r in rows]
    shift = k.shape[2] - q.shape[2]
    if rows == list(range(rows[0], rows[0] + len(rows))):  # a run of rows (the census asks for the last): a slice
        picked = q[:, :, rows[0] - shift:rows[0] - shift + len(rows)]
        positions = torch.arange(rows[0], rows[0] + len(rows), device=q.device)
    else:
        picked = q[:, :, torch.tensor([r - shift for r in rows], device=q.device)]
        positions = torch.tensor(rows, device=q.device)
    scores = torch.matmul(picked.float(), k.float().transpose(-1, -2)) * scaling
    return scores.masked_fill(~allowed_keys(positions, k.shape[2], window), float("-inf")).argmax(dim=-1)


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
        use_triton = triton_runs_on(q)
    if not use_triton:
        return reference_stats(q, k, scaling, window, lse, diagonals, argmax_rows, diagonal_start)
    if not triton_runs_on(q):
        raise AttnprobeError("Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones): move q, k to the GPU or pass use_triton=False")
    rules = [(0, 0)] + [(-off, 1) for off in diagonals]  # first token, then each diagonal
    lse, column_sum, entries = _passes(q, k, scaling, window, lse, rules)
    return AttentionStats(
        lse=lse,
        column_sum=column_sum,
        first_token=entries[:, :, 0],
        diagonal=diagonal_means_from_entries(entries[:, :, 1:], diagonals, k.shape[2] - q.shape[2], diagonal_start),
        argmax=None if argmax_rows is None else last_rows_argmax(q, k, scaling, argmax_rows, window),
    )


def diagonal_means_from_entries(entries, offsets, first_position: int, start: int = 0) -> dict[int, torch.Tensor]:
    """{off: mean of entries[..., j, i] over queries at positions >= max(off, start)} from (B, H, len(offsets), T)."""
    means = {}
    for j, off in enumerate(offsets):
        first = max(off, start) - first_position  # first query index that counts
        if first < entries.shape[-1]:
            means[off] = entries[:, :, j, max(first, 0):].mean(dim=-1)
    return means
