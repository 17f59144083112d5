"""Triton kernels of the fused multi-LoRA linear (launchers + @triton.jit kernels; no autograd, no nn).

Notation: x [M, IN] rows, W [N, IN], adapters A [K, r, IN], B [K, N, r], scale s [K], and a per-row,
per-column gate  g[m, j] = s_k · gate[b(m), k]  for the adapter k that column j of the low-rank space
belongs to and the sample b(m) = m // L of row m (L rows per sample). The op is
y = x Wᵀ + b + (g ⊙ S0) B_segᵀ  with  S0 = x A_segᵀ.

Rows are grouped into *segments* that share one low-rank pair, described by a per-sample routing
plan (``fastcp.ops.routing``) that one model forward builds once and every layer reuses:

- routed mode: segment k < K holds the samples routed to adapter k, segment K the base-only samples
  (id −1, no LoRA term). ``order`` [B] lists samples segment by segment and ``bounds`` [K+2] holds
  the segment offsets in samples; a layer with L rows per sample reads segment s as grouped rows
  [bounds[s]·L, bounds[s+1]·L), grouped row p being row order[p // L]·L + p % L. x is gathered row
  by row inside the kernels, never permuted in memory; with ``order`` = None (presorted ids) rows
  are read in place. Each program finds its segment by walking the bounds (``_locate``), so no
  host sync and no per-tile table are needed, and the grid is the upper bound
  cdiv(M, BLOCK_M) + segments (the few surplus programs do nothing).
- dense / all mode: one segment of every row; the K adapters are read as one stacked pair of rank
  R = K·r (column j belongs to adapter j // r; addressed through A's and B's strides, no copy) and
  g carries the per-sample coefficients (dense, read as coef[m // L, k]: never expanded to rows)
  or ones (all) times s.

Kernels (the rank is padded inside to BLOCK_R = next power of two >= 16, masked; never in the API):

``_shrink_kernel``   S0[rows, :R] = x[rows] @ P_segᵀ                     (fp32, small; kept for backward)
``_fused_kernel``    Y[rows, n]  = X[rows] @ Wᵀ[:, n] (+ b) + (g ⊙ S)[rows] @ Q_seg[n, :]ᵀ
                     one write of each output tile: the LoRA term is added to the GEMM accumulator;
                     tiles are visited in GROUP_M-grouped order so a band of x rows stays in L2
                     while every N tile of it is computed
``_dy_pass_kernel``  backward, one read of dy for up to three results: U0 = dy @ B_seg, per row tile
                     the partial dB_tile = dyᵀ (g ⊙ S0) (fp32, [tiles, N, R]), and (dense / all)
                     dg[m, k] = s_k Σ_{j ∈ k} U0[m, j] S0[m, j]
``_outer_kernel``    split-K partials  P[split] = RT[rows]ᵀ (g ⊙ L)[rows]  (dA = Σ xᵀ(g⊙U0); dB when
                     the dy-pass partials would cost more traffic than re-reading dy: large ranks)
``_reduce_kernel``   out_seg = Σ_{splits of seg, in index order} P[split]: a fixed order, no atomics,
                     so every gradient is bit-reproducible for a given config.

Forward = shrink (S0, returned to be saved for backward: R ≪ IN, so keeping M·R fp32 costs less
than recomputing x A_segᵀ, which reads x again) → fused. Backward = dy pass (U0, dB partials, dg)
→ fused (dx = dy W + (g⊙U0) A, dy's 2nd read) → outer (dA partials, reads x) → reduce. dy is read
twice when the per-tile dB partials move at most the bytes of one dy read (R <= 16 in bf16, R <= 32
in fp32, with 64-row tiles; R = r routed, K·r stacked): the U/dB pass and the dx GEMM (which cannot
produce U itself: every dx tile needs U's whole OUT-sum first). For larger R it is read three times
(see DB_PATH).

Launches go through ``torch.library.wrap_triton`` on a GPU, so the ops that call these launchers
(``fastcp.ops.backends.triton``, registered with ``triton_op``) are visible to torch.compile and
can be captured in CUDA graphs. In the interpreter the kernels are plain Python and run directly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# FASTCP_TRITON_AUTOTUNE=0 pins one config per kernel (results then also bit-identical across processes;
# autotuning may pick different tile sizes in different processes, which changes fp summation order).
AUTOTUNE = not INTERPRET and os.environ.get("FASTCP_TRITON_AUTOTUNE", "1") != "0"
# Where dB = Σ dyᵀ (g ⊙ S0) is computed. "dy_pass": in the pass that already reads dy for U0, as one fp32
# partial per row tile ([tiles, N, R], written then read by the reduction); "outer": split-K over a second
# read of dy, with few partials. "auto" picks the dy pass when its partial traffic is at most the bytes
# of the dy read it saves (2·4·R/DY_BLOCK_M <= dy's element size, i.e. R <= 16 in bf16 with 64-row
# tiles) and the partials fit in DY_PASS_PARTIAL_BYTES.
DB_PATH = "auto"
DY_PASS_PARTIAL_BYTES = 256 << 20


def _configs(full, small):
    """Autotune candidates: ``full`` on GPU, the single ``small`` config in the interpreter (every launch
    costs real time there) or when autotuning is off. One config means autotune does not benchmark."""
    chosen = full if AUTOTUNE else [small]
    return [triton.Config(dict(kw), num_warps=w, num_stages=s) for kw, w, s in chosen]


_GEMM_SMALL = (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), 4, 2) if INTERPRET else (
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 4, 3)
_GEMM_CONFIGS = _configs([
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 8, 3),
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 4, 3),
    (dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=32), 8, 4),
    (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 4, 4),
    (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 4),
    (dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64), 4, 4),
    (dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64), 4, 4),
], _GEMM_SMALL)
_SHRINK_SMALL = (dict(BLOCK_M=16, BLOCK_K=32), 4, 2) if INTERPRET else (dict(BLOCK_M=64, BLOCK_K=64), 4, 3)
_SHRINK_CONFIGS = _configs([
    (dict(BLOCK_M=64, BLOCK_K=64), 4, 3),
    (dict(BLOCK_M=64, BLOCK_K=128), 4, 3),
    (dict(BLOCK_M=128, BLOCK_K=64), 8, 3),
    (dict(BLOCK_M=32, BLOCK_K=128), 4, 4),
    (dict(BLOCK_M=16, BLOCK_K=256), 4, 3),
], _SHRINK_SMALL)
_DY_SMALL = (dict(BLOCK_O=32), 4, 2) if INTERPRET else (dict(BLOCK_O=64), 4, 3)
_DY_CONFIGS = _configs([
    (dict(BLOCK_O=64), 4, 3),
    (dict(BLOCK_O=128), 4, 3),
    (dict(BLOCK_O=128), 8, 3),
    (dict(BLOCK_O=32), 4, 4),
], _DY_SMALL)
_OUTER_SMALL = (dict(BLOCK_M=16, BLOCK_N=32), 4, 2) if INTERPRET else (dict(BLOCK_M=64, BLOCK_N=128), 4, 3)
_OUTER_CONFIGS = _configs([
    (dict(BLOCK_M=64, BLOCK_N=128), 4, 3),
    (dict(BLOCK_M=32, BLOCK_N=128), 4, 4),
    (dict(BLOCK_M=64, BLOCK_N=64), 4, 4),
    (dict(BLOCK_M=128, BLOCK_N=64), 8, 3),
], _OUTER_SMALL)
# Row-tile height of the dy pass is fixed (not tuned): its partial buffer is sized by it before launch.
DY_BLOCK_M = 16 if INTERPRET else 64


# L2-friendly visiting order of the fused GEMM's output tiles: GROUP_M row tiles share each sweep over N.
GROUP_M = 8


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _locate(item, BOUNDS, NSEG, L, GRAIN):
    """Work item ``item`` covers grouped rows [start, min(start + GRAIN, end)) of segment ``seg``, whose grouped
    rows are [BOUNDS[seg]·L, BOUNDS[seg+1]·L); items are numbered segment by segment, cdiv(rows, GRAIN) per
    segment. Past the last item: seg = -1, start = end = 0."""
    seg = item * 0 - 1
    start = item * 0
    end = item * 0
    base = item * 0
    for s in range(0, NSEG):
        a = tl.load(BOUNDS + s) * L
        b = tl.load(BOUNDS + s + 1) * L
        n = (b - a + GRAIN - 1) // GRAIN
        hit = (item >= base) & (item < base + n)
        seg = tl.where(hit, s, seg)
        start = tl.where(hit, a + (item - base) * GRAIN, start)
        end = tl.where(hit, b, end)
        base += n
    return seg, start, end


@triton.jit
def _rows(ORDER, offs_m, m_mask, L, GATHER: tl.constexpr):
    """Row indices (int64: row * stride may pass 2^31) of grouped positions offs_m: order[p // L]·L + p % L
    in routed mode, the positions themselves when the rows are already in group order (lets the compiler
    see contiguity)."""
    if GATHER:
        sample = tl.load(ORDER + offs_m // L, mask=m_mask, other=0).to(tl.int64)
        return sample * L + (offs_m % L)
    else:
        return offs_m.to(tl.int64)


@triton.jit
def _lowrank_offsets(seg, offs_r, RK, stride_k, stride_j, STACKED: tl.constexpr):
    """Element offset of low-rank column j in a [K, ·, r]-strided adapter tensor: adapter = seg (routed) or
    j // r (stacked), rank index j % r."""
    if STACKED:
        return (offs_r // RK) * stride_k + (offs_r % RK) * stride_j
    else:
        return tl.maximum(seg, 0) * stride_k + offs_r * stride_j


@triton.jit
def _gate(seg, rows, m_mask, offs_r, r_mask, RK, L, SCALE, GATES, stride_gm, stride_gk,
          STACKED: tl.constexpr, ROW_GATES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """g [BLOCK_M, BLOCK_R] fp32 = s_k (· coef[row // L, k] in dense mode: read per sample); 0 on padding."""
    if STACKED:
        kk = offs_r // RK
    else:
        kk = offs_r * 0 + tl.maximum(seg, 0)
    s = tl.load(SCALE + kk, mask=r_mask, other=0.0).to(tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32) + s[None, :]
    if ROW_GATES:
        g = g * tl.load(GATES + (rows // L)[:, None] * stride_gm + kk[None, :] * stride_gk,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    return g


# ----------------------------------------------------------------------------- kernels
@triton.autotune(configs=_SHRINK_CONFIGS, key=["M_BUCKET", "IN", "R"])
@triton.jit
def _shrink_kernel(X, P, S, ORDER, BOUNDS, NSEG, NLORA, L, M_BUCKET, IN, R, RK,
                   stride_xm, stride_xi, stride_pk, stride_pj, stride_pi, stride_sm,
                   STACKED: tl.constexpr, GATHER: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[row, j] = Σ_i X[row, i] P_seg[j, i] (fp32) for the rows of one tile of a LoRA segment."""
    seg, start, end = _locate(tl.program_id(0), BOUNDS, NSEG, L, BLOCK_M)
    if (seg >= 0) & (seg < NLORA):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        rows = _rows(ORDER, offs_m, m_mask, L, GATHER)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        p_cols = _lowrank_offsets(seg, offs_r, RK, stride_pk, stride_pj, STACKED)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < IN
            x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xi,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            p = tl.load(P + p_cols[None, :] + offs_k[:, None] * stride_pi,
                        mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            acc = tl.dot(x, p, acc, input_precision=PREC)
        tl.store(S + rows[:, None] * stride_sm + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


# stride_wi in the key: the forward (W read along IN) and dx (W read transposed) of a square layer tune apart
@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "IN", "R", "stride_wi"])
@triton.jit
def _fused_kernel(X, W, BIAS, S, Q, Y, ORDER, BOUNDS, NSEG, NLORA, L, SCALE, GATES, M, M_BUCKET, IN, N, R, RK,
                  stride_xm, stride_xi, stride_wn, stride_wi, stride_sm, stride_qk, stride_qn, stride_qj,
                  stride_gm, stride_gk, stride_ym,
                  HAS_BIAS: tl.constexpr, STACKED: tl.constexpr, GATHER: tl.constexpr, ROW_GATES: tl.constexpr,
                  PREC: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Y[rows, n] = X[rows] @ W[n, :]ᵀ (+ b[n]) + (g ⊙ S)[rows] @ Q_seg[n, :]ᵀ, each tile written once.

    One flat grid of (row items × N tiles) visited in GROUP-grouped order: GROUP consecutive row items
    sweep the N tiles together, so their x rows are re-read from L2 rather than HBM."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M) + NSEG
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(num_m - first_m, GROUP)
    item = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    seg, start, end = _locate(item, BOUNDS, NSEG, L, BLOCK_M)
    if seg >= 0:
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        rows = _rows(ORDER, offs_m, m_mask, L, GATHER)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < IN
            x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xi,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wi,
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PREC)
        if seg < NLORA:
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            sm = m_mask[:, None] & r_mask[None, :]
            s = tl.load(S + rows[:, None] * stride_sm + offs_r[None, :], mask=sm, other=0.0)
            s = s * _gate(seg, rows, m_mask, offs_r, r_mask, RK, L, SCALE, GATES, stride_gm, stride_gk,
                          STACKED, ROW_GATES, BLOCK_M, BLOCK_R)
            q_cols = _lowrank_offsets(seg, offs_r, RK, stride_qk, stride_qj, STACKED)
            q = tl.load(Q + q_cols[:, None] + offs_n[None, :] * stride_qn, mask=r_mask[:, None] & n_mask[None, :],
                        other=0.0)
            # S in the operand dtype (bf16/fp16 on GPU) so the LoRA term uses the tensor cores as well
            acc = tl.dot(s.to(q.dtype), q, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_DY_CONFIGS, key=["M_BUCKET", "OUT", "R"])
@triton.jit
def _dy_pass_kernel(DY, B, S0, U0, PART, DG, ORDER, BOUNDS, NSEG, NLORA, L, SCALE, GATES, M_BUCKET, OUT, R, RK, NK,
                    stride_dm, stride_do, stride_bk, stride_bo, stride_bj, stride_sm, stride_um, stride_pt, stride_po,
                    stride_gm, stride_gk, stride_dgm,
                    STACKED: tl.constexpr, GATHER: tl.constexpr, ROW_GATES: tl.constexpr, WITH_DB: tl.constexpr,
                    WITH_DG: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KK: tl.constexpr):
    """One read of dy[rows] per row tile: U0[rows] = dy[rows] @ B_seg (fp32); with WITH_DB, this tile's dB
    partial PART[tile, o, j] = Σ_{rows} dy[row, o] (g ⊙ S0)[row, j]; with WITH_DG (stacked only), the
    per-row gate gradient DG[row, k] = s_k Σ_{j: j // r = k} U0[row, j] S0[row, j]."""
    tile = tl.program_id(0)
    seg, start, end = _locate(tile, BOUNDS, NSEG, L, BLOCK_M)
    if (seg >= 0) & (seg < NLORA):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        rows = _rows(ORDER, offs_m, m_mask, L, GATHER)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        b_cols = _lowrank_offsets(seg, offs_r, RK, stride_bk, stride_bj, STACKED)
        if WITH_DB or WITH_DG:
            s0 = tl.load(S0 + rows[:, None] * stride_sm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                         other=0.0)
        if WITH_DB:
            sg = s0 * _gate(seg, rows, m_mask, offs_r, r_mask, RK, L, SCALE, GATES, stride_gm, stride_gk,
                            STACKED, ROW_GATES, BLOCK_M, BLOCK_R)
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for o0 in range(0, OUT, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            o_mask = offs_o < OUT
            dy = tl.load(DY + rows[:, None] * stride_dm + offs_o[None, :] * stride_do,
                         mask=m_mask[:, None] & o_mask[None, :], other=0.0)
            b = tl.load(B + offs_o[:, None] * stride_bo + b_cols[None, :], mask=o_mask[:, None] & r_mask[None, :],
                        other=0.0)
            u = tl.dot(dy, b, u, input_precision=PREC)
            if WITH_DB:
                part = tl.dot(tl.trans(dy), sg.to(dy.dtype), input_precision=PREC)
                tl.store(PART + tile.to(tl.int64) * stride_pt + offs_o[:, None] * stride_po + offs_r[None, :], part,
                         mask=o_mask[:, None] & r_mask[None, :])
        tl.store(U0 + rows[:, None] * stride_um + offs_r[None, :], u, mask=m_mask[:, None] & r_mask[None, :])
        if WITH_DG:
            # segmented sum over each adapter's r columns as one small exact product with the 0/1 matrix
            # E[j, k] = [j // r = k] (fp32 "ieee": the sum must not round through tf32)
            offs_kk = tl.arange(0, BLOCK_KK)
            kk_mask = offs_kk < NK
            e = (((offs_r[:, None] // RK) == offs_kk[None, :]) & r_mask[:, None]).to(tl.float32)
            dg = tl.dot(u * s0, e, input_precision="ieee")
            dg = dg * tl.load(SCALE + offs_kk, mask=kk_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(DG + rows[:, None] * stride_dgm + offs_kk[None, :], dg, mask=m_mask[:, None] & kk_mask[None, :])


@triton.autotune(configs=_OUTER_CONFIGS, key=["SPLIT", "N", "R"])
@triton.jit
def _outer_kernel(LM, RT, PART, ORDER, BOUNDS, NSEG, NLORA, L, SCALE, GATES, SPLIT, N, R, RK,
                  stride_lm, stride_rm, stride_rn, stride_pt, stride_pn, stride_gm, stride_gk,
                  STACKED: tl.constexpr, GATHER: tl.constexpr, ROW_GATES: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Split-K partial PART[split, n, j] = Σ_{rows of the split, in order} RT[row, n] (g ⊙ LM)[row, j]."""
    split = tl.program_id(0)
    seg, start, end = _locate(split, BOUNDS, NSEG, L, SPLIT)
    if (seg >= 0) & (seg < NLORA):
        stop = tl.minimum(start + SPLIT, end)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for m0 in range(start, stop, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < stop
            rows = _rows(ORDER, offs_m, m_mask, L, GATHER)
            lg = tl.load(LM + rows[:, None] * stride_lm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                         other=0.0)
            lg = lg * _gate(seg, rows, m_mask, offs_r, r_mask, RK, L, SCALE, GATES, stride_gm, stride_gk,
                            STACKED, ROW_GATES, BLOCK_M, BLOCK_R)
            rt = tl.load(RT + rows[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(tl.trans(rt), lg.to(rt.dtype), acc, input_precision=PREC)
        tl.store(PART + split.to(tl.int64) * stride_pt + offs_n[:, None] * stride_pn + offs_r[None, :], acc,
                 mask=n_mask[:, None] & r_mask[None, :])


@triton.jit
def _reduce_kernel(PART, OUT, BOUNDS, L, GRAIN, N, R, RK, stride_pt, stride_pn,
                   stride_ok, stride_on, stride_oj,
                   STACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """out_seg[n, j] = Σ_{work items of segment seg, in index order} PART[item, n, j] (zero for an empty
    segment), written to the adapter tensor through its strides."""
    seg = tl.program_id(0)
    base = seg * 0
    for s in range(0, seg):
        base += ((tl.load(BOUNDS + s + 1) - tl.load(BOUNDS + s)) * L + GRAIN - 1) // GRAIN
    count = ((tl.load(BOUNDS + seg + 1) - tl.load(BOUNDS + seg)) * L + GRAIN - 1) // GRAIN
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    mask = n_mask[:, None] & r_mask[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for t in range(base, base + count):
        acc += tl.load(PART + t * stride_pt + offs_n[:, None] * stride_pn + offs_r[None, :], mask=mask,
                       other=0.0)
    cols = _lowrank_offsets(seg, offs_r, RK, stride_ok, stride_oj, STACKED)
    tl.store(OUT + cols[None, :] + offs_n[:, None] * stride_on, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _launch(kernel):
    """The kernel as torch.compile must see it on a GPU (``wrap_triton``: traced into the graph, so the ops
    built on these launchers compile without graph breaks and capture in CUDA graphs). The interpreter's
    kernels are Python functions that wrap_triton does not accept; they run directly."""
    if INTERPRET:
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def block_r(R: int) -> int:
    """Rank padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(R)))


def _m_bucket(M: int) -> int:
    # autotune key: nearby row counts share a config instead of retuning per batch size
    return triton.next_power_of_2(max(int(M), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products unless torch allows TF32 for matmuls; 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class Segments:
    """Rows of one layer grouped by low-rank pair, from a per-sample plan (all on the device).

    order [B] int32 or None: samples in group order (None: rows are already in group order).
    bounds [nseg + 1] int32: segment s holds the samples at group positions [bounds[s], bounds[s+1]),
    i.e. the grouped rows [bounds[s]·L, bounds[s+1]·L).
    nlora: segments 0..nlora-1 carry a LoRA term (later ones are base-only rows).
    stacked: one segment holds every row and the K adapters act as one pair of rank K·r.
    """

    def __init__(self, order, bounds: torch.Tensor, nlora: int, stacked: bool, batch: int, rows_per_sample: int):
        self.order, self.bounds, self.nlora, self.stacked = order, bounds, int(nlora), bool(stacked)
        self.num = int(bounds.shape[0]) - 1
        self.B, self.L = int(batch), int(rows_per_sample)
        self.M = self.B * self.L

    @property
    def gather(self) -> bool:
        return self.order is not None

    def order_arg(self):
        # a dummy pointer when rows are read in place (GATHER=False never dereferences it)
        return self.order if self.order is not None else self.bounds

    def max_items(self, grain: int) -> int:
        """Upper bound of Σ_s cdiv(rows_s, grain): the grid size of a launch over this segmentation."""
        return triton.cdiv(self.M, grain) + self.num


def routed_segments(order, bounds: torch.Tensor, K: int, batch: int, rows_per_sample: int) -> Segments:
    """Segments 0..K-1 = samples of adapter k, segment K = base-only samples; bounds [K+2] from the plan."""
    return Segments(order, bounds, K, stacked=False, batch=batch, rows_per_sample=rows_per_sample)


def stacked_segments(bounds: torch.Tensor, batch: int, rows_per_sample: int) -> Segments:
    """One segment of every row (dense / all modes); bounds = (0, B)."""
    return Segments(None, bounds, 1, stacked=True, batch=batch, rows_per_sample=rows_per_sample)


def _gate_args(gates):
    # routed / all: no gates; a dummy pointer with zero strides is never read (ROW_GATES=False)
    if gates is None:
        return None, 0, 0, False
    return gates, gates.stride(0), gates.stride(1), True


def shrink(x: torch.Tensor, lora_a: torch.Tensor, segs: Segments, R: int, RK: int) -> torch.Tensor:
    """S0 [M, R] fp32 = x[rows] @ A_segᵀ for rows of LoRA segments (base-only rows are zero).

    x [M, IN]; lora_a [K, r, IN] with RK = r; R = r (routed) or K·r (stacked)."""
    M, IN = x.shape
    # zeros, not empty: base-only rows are never written, and S is saved for backward (a defined value
    # keeps it deterministic and safe to read by anything downstream)
    S = (torch.zeros if segs.num > segs.nlora else torch.empty)(M, R, dtype=torch.float32, device=x.device)
    grid = lambda meta: (segs.max_items(meta["BLOCK_M"]),)  # noqa: E731
    _launch(_shrink_kernel)[grid](
        x, lora_a, S, segs.order_arg(), segs.bounds, segs.num, segs.nlora, segs.L, _m_bucket(M), IN, R, RK,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), S.stride(0),
        STACKED=segs.stacked, GATHER=segs.gather, PREC=dot_precision(x.dtype), BLOCK_R=block_r(R))
    return S


def fused(x, w, w_strides, bias, S, q, q_strides, scale, gates, segs: Segments, N: int, R: int, RK: int,
          out_dtype) -> torch.Tensor:
    """Y [M, N] = x @ wᵀ (+ bias) + (g ⊙ S) @ q_segᵀ, one write per output tile.

    x [M, IN]; w addressed as w[n, i] through ``w_strides`` = (along N, along IN) (pass W's strides
    swapped to multiply by W instead of Wᵀ); S [M, R] fp32; q a [K, ·, r] adapter tensor addressed through
    ``q_strides`` = (adapter, along N, rank); scale [K] fp32; gates [B, K] per sample (dense) or None."""
    M, IN = x.shape
    Y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    g, sgm, sgk, row_gates = _gate_args(gates)
    grid = lambda meta: (segs.max_items(meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _launch(_fused_kernel)[grid](
        x, w, bias if bias is not None else x, S, q, Y, segs.order_arg(), segs.bounds, segs.num, segs.nlora, segs.L,
        scale, g if g is not None else scale, M, _m_bucket(M), IN, N, R, RK,
        x.stride(0), x.stride(1), w_strides[0], w_strides[1], S.stride(0), q_strides[0], q_strides[1], q_strides[2],
        sgm, sgk, Y.stride(0),
        HAS_BIAS=bias is not None, STACKED=segs.stacked, GATHER=segs.gather, ROW_GATES=row_gates,
        PREC=dot_precision(x.dtype), GROUP=GROUP_M, BLOCK_R=block_r(R))
    return Y


def _reduce(part, grain, out, out_strides, segs: Segments, N: int, R: int, RK: int):
    """out (an adapter tensor [K, ·, r], written through ``out_strides`` = (adapter, along N, rank))."""
    bn = 32 if INTERPRET else 64
    _launch(_reduce_kernel)[(segs.nlora, triton.cdiv(N, bn))](
        part, out, segs.bounds, segs.L, grain, N, R, RK, part.stride(0), part.stride(1),
        out_strides[0], out_strides[1], out_strides[2],
        STACKED=segs.stacked, BLOCK_N=bn, BLOCK_R=block_r(R), num_warps=4)


def _split_rows(M: int, N: int) -> int:
    """Rows per split-K work item of ``outer``: enough items to fill the GPU (~2 waves of 132 SMs over the
    N blocks), each a multiple of 64 rows. Small in the interpreter so tests cover multi-split sums."""
    if INTERPRET:
        return 32
    items = max(1, 264 // triton.cdiv(N, 128))
    return max(64, triton.cdiv(triton.cdiv(M, items), 64) * 64)


def outer(LM, RT, scale, gates, segs: Segments, out, out_strides, N: int, R: int, RK: int):
    """out_seg[n, j] = Σ_{rows of seg} RT[row, n] (g ⊙ LM)[row, j]: split-K partials + fixed-order reduction.

    LM [M, R] fp32 (U0 or S0), RT [M, N] (x or dy); out an adapter tensor written through ``out_strides``."""
    M = RT.shape[0]
    split = _split_rows(M, N)
    items = segs.max_items(split)
    part = torch.empty(items, N, R, dtype=torch.float32, device=RT.device)
    g, sgm, sgk, row_gates = _gate_args(gates)
    grid = lambda meta: (items, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _launch(_outer_kernel)[grid](
        LM, RT, part, segs.order_arg(), segs.bounds, segs.num, segs.nlora, segs.L, scale,
        g if g is not None else scale, split, N, R, RK, LM.stride(0), RT.stride(0), RT.stride(1), part.stride(0),
        part.stride(1), sgm, sgk,
        STACKED=segs.stacked, GATHER=segs.gather, ROW_GATES=row_gates, PREC=dot_precision(RT.dtype),
        BLOCK_R=block_r(R))
    _reduce(part, split, out, out_strides, segs, N, R, RK)
    return out


def db_in_dy_pass(M: int, OUT: int, R: int, dy_element_size: int, block_m: int | None = None) -> bool:
    """Whether dB comes from the dy pass's per-tile partials (see DB_PATH) rather than a split-K outer.

    The partials written and read back cost 2 · cdiv(M, block_m) · OUT · R · 4 bytes against the
    M · OUT · element_size bytes of the dy read they save. The count is of real row tiles: the grid's
    surplus items (one per segment, for segment ends that are not tile-aligned) write nothing of
    consequence in the common case, and counting them made r = 16 in bf16 miss the one-read route."""
    if DB_PATH not in ("auto", "dy_pass", "outer"):
        raise ValueError(f"DB_PATH: expected auto/dy_pass/outer, got {DB_PATH!r}")
    if DB_PATH != "auto":
        return DB_PATH == "dy_pass"
    bm = block_m or DY_BLOCK_M
    part = triton.cdiv(int(M), bm) * OUT * R * 4
    return part <= DY_PASS_PARTIAL_BYTES and 2 * part <= M * OUT * dy_element_size


def dy_pass(dy, lora_b, S0, scale, gates, segs: Segments, R: int, RK: int, db=None, num_adapters: int = 0,
            with_dg: bool = False):
    """U0 [M, R] fp32 = dy[rows] @ B_seg; with ``db`` ([K, OUT, r], written in place) dB_k = Σ dyᵀ (g ⊙ S0)
    from the same read of dy (per-tile partials, fixed-order reduction); with ``with_dg`` (stacked only) the
    per-row gate gradient dg [M, K] fp32. Returns (U0, whether dB was done, dg or None): dB is left to the
    caller when ``db_in_dy_pass`` says the partials cost more than a second read of dy."""
    M, OUT = dy.shape
    tiles = segs.max_items(DY_BLOCK_M)
    with_db = db is not None and db_in_dy_pass(M, OUT, R, dy.element_size())
    with_dg = bool(with_dg) and segs.stacked
    U0 = torch.empty(M, R, dtype=torch.float32, device=dy.device)
    part = torch.empty((tiles, OUT, R) if with_db else (1, 1, 1), dtype=torch.float32, device=dy.device)
    K = int(num_adapters)
    dg = torch.empty((M, K) if with_dg else (1, 1), dtype=torch.float32, device=dy.device)
    g, sgm, sgk, row_gates = _gate_args(gates)
    s_arg = S0 if S0 is not None else U0
    _launch(_dy_pass_kernel)[(tiles,)](
        dy, lora_b, s_arg, U0, part, dg, segs.order_arg(), segs.bounds, segs.num, segs.nlora, segs.L,
        scale, g if g is not None else scale, _m_bucket(M), OUT, R, RK, max(K, 1),
        dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        s_arg.stride(0), U0.stride(0), part.stride(0), part.stride(1), sgm, sgk, dg.stride(0),
        STACKED=segs.stacked, GATHER=segs.gather, ROW_GATES=row_gates, WITH_DB=with_db, WITH_DG=with_dg,
        PREC=dot_precision(dy.dtype), BLOCK_M=DY_BLOCK_M, BLOCK_R=block_r(R),
        BLOCK_KK=max(16, triton.next_power_of_2(max(K, 1))))
    if with_db:
        _reduce(part, DY_BLOCK_M, db, (db.stride(0), db.stride(1), db.stride(2)), segs, OUT, R, RK)
    return U0, with_db, (dg if with_dg else None)
