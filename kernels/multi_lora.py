"""Triton kernels of the fused multi-LoRA linear (launchers + @triton.jit kernels, no autograd).

Two kernels cover forward and backward:

``_shrink_kernel``   S[rows, :R] = gate ⊙ (X[rows] @ Pᵀ)         per row tile of one segment
``_fused_kernel``    Y[rows, n]  = X[rows] @ Wᵀ[:, n] (+ b[n]) + S[rows, :R] @ Qᵀ[:, n]

A *segment* is a set of rows that share one low-rank pair (P [R, IN], Q [N, R]): in routed mode
one segment per adapter (rows found through a stable argsort of the ids — x is indexed, never
permuted), plus a segment of base-only rows (id −1) that skips the LoRA term; in dense / all mode
one segment of every row, with the K adapters stacked into one pair of rank K·r and the per-row
gates applied to S. The LoRA term is added to the base GEMM's accumulator inside the output tile,
so y makes one trip to memory.

Backward reuses both with transposed operands (strides, not copies):
``U = gate ⊙ (dy @ B)`` is a shrink with P = Bᵀ, and ``dx = dy @ W + U @ A`` is a fused GEMM with
W → Wᵀ, Q → Aᵀ. dA = Uᵀ X and dB = dyᵀ S per segment come from ``_segment_outer_kernel``, which
walks its segment's rows in a fixed order (no atomics: deterministic). Ranks are padded to a
power of two >= 16 inside the kernels (masked loads), never in the API.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _shrink_kernel(X, P, S, GATE, ROWS, TILE_SEG, TILE_START, SEG_START, SEG_END, SEG_P_OFF,
                   IN, R, stride_xm, stride_xk, stride_pr, stride_pk, stride_sm, stride_gm, stride_gr,
                   GATE_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[row, :R] = gate[row or seg, :R] * sum_k X[row, k] P_seg[:R, k] for the tile's rows."""
    tile = tl.program_id(0)
    seg = tl.load(TILE_SEG + tile)
    start = tl.load(TILE_START + tile)
    end = tl.load(SEG_END + seg)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    p_base = P + tl.load(SEG_P_OFF + seg)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN
        x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        p = tl.load(p_base + offs_r[None, :] * stride_pr + offs_k[:, None] * stride_pk,
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc += tl.dot(x.to(tl.float32), p.to(tl.float32))
    if GATE_PER_ROW:
        g = tl.load(GATE + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    else:
        g = tl.load(GATE + seg * stride_gm + offs_r[None, :] * stride_gr, mask=r_mask[None, :], other=0.0)
    acc = acc * g.to(tl.float32)
    tl.store(S + rows[:, None] * stride_sm + offs_r[None, :], acc.to(S.dtype.element_ty),
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _fused_kernel(X, W, BIAS, S, Q, Y, ROWS, TILE_SEG, TILE_START, SEG_END, SEG_Q_OFF, SEG_HAS_LORA,
                  IN, N, R, stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_qn, stride_qr, stride_ym,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """Y[rows, n] = X[rows] @ W[n, :]ᵀ (+ bias) + S[rows, :R] @ Q_seg[n, :R]ᵀ, written once."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(TILE_SEG + tile)
    start = tl.load(TILE_START + tile)
    end = tl.load(SEG_END + seg)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN
        x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
    if tl.load(SEG_HAS_LORA + seg) != 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        s = tl.load(S + rows[:, None] * stride_sm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        q = tl.load(Q + tl.load(SEG_Q_OFF + seg) + offs_n[None, :] * stride_qn + offs_r[:, None] * stride_qr,
                    mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc += tl.dot(s.to(tl.float32), q.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _segment_outer_kernel(L, RT, OUT, ROWS, SEG_START, SEG_END, SEG_OUT_OFF, R, N,
                          stride_lm, stride_rm, stride_rn, stride_or, stride_on,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT_seg[:R, n] = Σ_{rows of seg} L[row, :R]ᵀ RT[row, n], rows walked in a fixed order."""
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(SEG_START + seg)
    end = tl.load(SEG_END + seg)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        rows = tl.load(ROWS + offs_m, mask=m_mask, other=0)
        lt = tl.load(L + rows[None, :] * stride_lm + offs_r[:, None], mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        rt = tl.load(RT + rows[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(lt.to(tl.float32), rt.to(tl.float32))
    out_base = OUT + tl.load(SEG_OUT_OFF + seg)
    tl.store(out_base + offs_r[:, None] * stride_or + offs_n[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
             mask=r_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- launch helpers
def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _blocks(M: int, N: int, IN: int):
    """Tile sizes keyed by shape. Interpreter: one small config (every launch costs ~0.5 s)."""
    if INTERPRET:
        return 16, 32, 32
    bm = 64 if M >= 64 else 16
    bn = 128 if N >= 128 else 64
    bk = 64 if IN >= 64 else 32
    return bm, bn, bk


class Segments:
    """Row segments and their tiles. ``rows`` [M] int32 are row indices grouped by segment;
    segment s covers rows[start[s]:end[s]]; tiles are (segment, start) pairs of BLOCK_M rows."""

    def __init__(self, rows, start, end, block_m, device):
        self.rows = rows.to(device=device, dtype=torch.int32).contiguous()
        self.start = torch.as_tensor(start, dtype=torch.int32, device=device)
        self.end = torch.as_tensor(end, dtype=torch.int32, device=device)
        tile_seg, tile_start = [], []
        for s, (a, b) in enumerate(zip(start, end)):
            for t in range(a, b, block_m):
                tile_seg.append(s)
                tile_start.append(t)
        self.tile_seg = torch.tensor(tile_seg, dtype=torch.int32, device=device)
        self.tile_start = torch.tensor(tile_start, dtype=torch.int32, device=device)
        self.num_tiles = len(tile_seg)
        self.num = len(start)


def routed_segments(row_ids: torch.Tensor, K: int, block_m: int) -> Segments:
    """Segments 0..K-1 = adapters, segment K = base-only rows (id -1)."""
    ids = row_ids.long()
    key = torch.where(ids < 0, torch.full_like(ids, K), ids)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=K + 1).tolist()  # one small host sync per call
    start, pos = [], 0
    for c in counts:
        start.append(pos)
        pos += c
    end = [s + c for s, c in zip(start, counts)]
    return Segments(order, start, end, block_m, row_ids.device)


def single_segment(M: int, block_m: int, device) -> Segments:
    return Segments(torch.arange(M, device=device), [0], [M], block_m, device)


def shrink(x, p, p_offsets, p_strides, gates, gate_per_row, segs: Segments, R: int, out_dtype=torch.float32):
    """S [M, R] (fp32): per segment, gate ⊙ (x[rows] @ p_segᵀ). Segment s's [R, IN] block starts
    ``p_offsets[s]`` elements into ``p`` with strides ``p_strides`` = (along R, along IN)."""
    M, IN = x.shape
    S = torch.zeros(M, R, dtype=out_dtype, device=x.device)
    if segs.num_tiles == 0:
        return S
    bm, _, bk = _blocks(M, R, IN)
    _shrink_kernel[(segs.num_tiles,)](
        x, p, S, gates, segs.rows, segs.tile_seg, segs.tile_start, segs.start, segs.end, p_offsets,
        IN, R, x.stride(0), x.stride(1), p_strides[0], p_strides[1], S.stride(0), gates.stride(0), gates.stride(1),
        GATE_PER_ROW=gate_per_row, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=_pow2_at_least_16(R))
    return S


def fused(x, w, w_strides, bias, S, q, q_offsets, q_strides, seg_has_lora, segs: Segments, N: int, R: int, out_dtype):
    """Y [M, N] = x @ wᵀ (+ bias) + S @ q_segᵀ, one write per output tile."""
    M, IN = x.shape
    Y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    bm, bn, bk = _blocks(M, N, IN)
    grid = (segs.num_tiles, triton.cdiv(N, bn))
    _fused_kernel[grid](
        x, w, bias if bias is not None else x, S, q, Y, segs.rows, segs.tile_seg, segs.tile_start, segs.end,
        q_offsets, seg_has_lora, IN, N, R, x.stride(0), x.stride(1), w_strides[0], w_strides[1], S.stride(0),
        q_strides[0], q_strides[1], Y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_pow2_at_least_16(R))
    return Y


def segment_outer(L, RT, segs: Segments, out, out_offsets, out_strides, R: int, N: int, num_segments: int):
    """out_seg[:R, :N] = L[rows]ᵀ RT[rows] for the first ``num_segments`` segments."""
    M = L.shape[0]
    bm, bn, _ = _blocks(M, N, N)
    grid = (num_segments, triton.cdiv(N, bn))
    _segment_outer_kernel[grid](
        L, RT, out, segs.rows, segs.start, segs.end, out_offsets, R, N,
        L.stride(0), RT.stride(0), RT.stride(1), out_strides[0], out_strides[1],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=_pow2_at_least_16(R))
    return out
