"""Triton backend: fused base GEMM + LoRA (kernels/multi_lora.py), routed and dense/all modes.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (fp32 only there: the
interpreter's bf16 ``tl.dot`` is wrong). See the kernel module for the segment scheme.
"""
from __future__ import annotations

import os

import torch

from fastcp.ops.backends.base import Backend, LoraProblem, common_refusals


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        from fastcp.kernels import multi_lora as K  # imports triton

        self.k = K

    def unavailable_reason(self):
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"

    def refuse(self, p: LoraProblem) -> list[str]:
        if p.x.device.type == "cuda":
            return common_refusals(p, devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16))
        if os.environ.get("FASTCP_BACKEND") != "triton":
            # The interpreter is a correctness tool, never the fast path: CPU inputs go to cpp.
            return ["CPU tensors run the Triton interpreter only when FASTCP_BACKEND=triton forces it"]
        return common_refusals(p, devices=("cpu",), dtypes=(torch.float32,))

    # -------------------------------------------------------------- problem layout
    def _layout(self, p: LoraProblem):
        """(segments, rank R, shrink operand/offsets/strides, gates, gate_per_row, expand operand/offsets/strides,
        seg_has_lora, number of adapter segments, dense-gate helper or None)."""
        M, IN, OUT, K, r = p.shape
        dev = p.x.device
        bm = self.k._blocks(M, OUT, IN)[0]
        if p.mode == "routed":
            segs = self.k.routed_segments(p.row_ids, K, bm)
            offs_a = torch.tensor([k * p.lora_a.stride(0) for k in range(K)] + [0], device=dev)
            offs_b = torch.tensor([k * p.lora_b.stride(0) for k in range(K)] + [0], device=dev)
            seg_gates = torch.zeros(K + 1, r, dtype=torch.float32, device=dev)
            seg_gates[:K] = p.scale.float()[:, None]
            has_lora = torch.tensor([1] * K + [0], dtype=torch.int32, device=dev)
            return dict(segs=segs, R=r, A=p.lora_a, a_off=offs_a, a_str=(p.lora_a.stride(1), p.lora_a.stride(2)),
                        B=p.lora_b, b_off=offs_b, b_str=(p.lora_b.stride(1), p.lora_b.stride(2)),
                        gates=seg_gates, per_row=False, has_lora=has_lora, nseg=K, dense=None)
        # dense / all: K adapters stacked as one LoRA of rank K·r; gates per row and column.
        segs = self.k.single_segment(M, bm, dev)
        A_all = p.lora_a.reshape(K * r, IN)
        B_all = p.lora_b.permute(1, 0, 2).reshape(OUT, K * r)
        G = (p.gates().float() * p.scale.float()[None, :]).repeat_interleave(r, dim=1).contiguous()  # [M, K r]
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        return dict(segs=segs, R=K * r, A=A_all, a_off=zero, a_str=(A_all.stride(0), A_all.stride(1)),
                    B=B_all, b_off=zero, b_str=(B_all.stride(0), B_all.stride(1)),
                    gates=G, per_row=True, has_lora=torch.ones(1, dtype=torch.int32, device=dev), nseg=1, dense=G)

    # -------------------------------------------------------------- forward / backward
    def forward(self, p: LoraProblem) -> torch.Tensor:
        k, L = self.k, self._layout(p)
        M, IN, OUT, _, _ = p.shape
        S = k.shrink(p.x, L["A"], L["a_off"], L["a_str"], L["gates"], L["per_row"], L["segs"], L["R"])
        # Y = x Wᵀ + b + S Bᵀ : W[n, k] at W + n·stride0 + k·stride1; B_seg[n, j] likewise
        return k.fused(p.x, p.weight, (p.weight.stride(0), p.weight.stride(1)), p.bias, S, L["B"], L["b_off"],
                       L["b_str"], L["has_lora"], L["segs"], OUT, L["R"], p.x.dtype)

    def backward(self, p, dy, need_dx, need_da, need_db, need_dg):
        k, L = self.k, self._layout(p)
        M, IN, OUT, K, r = p.shape
        R, segs = L["R"], L["segs"]
        dense = L["dense"]
        ones = torch.ones_like(dense) if dense is not None else None
        # U = gate ⊙ (dy B): a shrink with P = Bᵀ (strides swapped, no copy)
        b_t = (L["b_str"][1], L["b_str"][0])
        gates_u = ones if dense is not None else L["gates"]
        U0 = k.shrink(dy, L["B"], L["b_off"], b_t, gates_u, L["per_row"], segs, R)
        U = U0 * dense if dense is not None else U0
        dx = da = db = dg = None
        if need_dx:
            # dx = dy W + U A : "W" indexed [n=in, k=out] and Q = A indexed [n=in, j]
            a_t = (L["a_str"][1], L["a_str"][0])
            dx = k.fused(dy, p.weight, (p.weight.stride(1), p.weight.stride(0)), None, U, L["A"], L["a_off"], a_t,
                         L["has_lora"], segs, IN, R, p.x.dtype)
        S = None
        if need_db or need_dg:
            gates_s = ones if dense is not None else L["gates"]
            S0 = k.shrink(p.x, L["A"], L["a_off"], L["a_str"], gates_s, L["per_row"], segs, R)
            S = S0 * dense if dense is not None else S0
            if need_dg and dense is not None:
                dg = (U0 * S0).view(M, K, r).sum(-1).mul_(p.scale.float()[None, :]).to(p.x.dtype)
        if need_da:
            # dA_seg[j, i] = Σ_rows U[row, j] x[row, i]
            da = torch.empty_like(p.lora_a)
            if dense is None:
                offs = torch.tensor([kk * da.stride(0) for kk in range(K)], device=da.device)
                k.segment_outer(U, p.x, segs, da, offs, (da.stride(1), da.stride(2)), R, IN, L["nseg"])
            else:
                da_all = da.view(K * r, IN)
                k.segment_outer(U, p.x, segs, da_all, torch.zeros(1, dtype=torch.int64, device=da.device),
                                (da_all.stride(0), da_all.stride(1)), R, IN, 1)
        if need_db:
            # dB_seg[o, j] = Σ_rows dy[row, o] S[row, j]; computed as its transpose [j, o]
            db = torch.empty_like(p.lora_b)
            if dense is None:
                offs = torch.tensor([kk * db.stride(0) for kk in range(K)], device=db.device)
                k.segment_outer(S, dy, segs, db, offs, (db.stride(2), db.stride(1)), R, OUT, L["nseg"])
            else:
                tmp = torch.empty(K * r, OUT, dtype=db.dtype, device=db.device)
                k.segment_outer(S, dy, segs, tmp, torch.zeros(1, dtype=torch.int64, device=db.device),
                                (tmp.stride(0), tmp.stride(1)), R, OUT, 1)
                db.copy_(tmp.view(K, r, OUT).permute(0, 2, 1))
        return dx, da, db, dg
