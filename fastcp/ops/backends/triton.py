"""Triton backend: fused base GEMM + LoRA (``fastcp.kernels.multi_lora``), modes routed, dense and all.

Runs on CUDA tensors (fp32/bf16/fp16, fp32 accumulation), or on CPU tensors under
``TRITON_INTERPRET=1`` (fp32 only: the interpreter's bf16 ``tl.dot`` is wrong) when
``FASTCP_BACKEND=triton`` forces it — the interpreter is a correctness tool, never a fast path.

Forward:   S0 = x A_segᵀ (shrink), then y = x Wᵀ + b + (g ⊙ S0) B_segᵀ in one GEMM whose output tiles
           add the LoRA term before their single write.
Backward:  S0 again (shrink; cheaper than keeping it: R ≪ in), one pass over dy for U0 = dy B_seg and
           dB = Σ dyᵀ (g ⊙ S0), dx = dy W + (g ⊙ U0) A_seg (the second and last read of dy),
           dA = Σ (g ⊙ U0)ᵀ x (split-K), dg[m, k] = s_k Σ_{j ∈ k} U0[m, j] S0[m, j] (dense / all).
Here g[m, j] = s_k · gate[m, k] for the adapter k of low-rank column j (routed: s_k of the row's segment).
"""
from __future__ import annotations

import os

import torch

from fastcp.ops.backends.base import Backend, LoraProblem, common_refusals

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        from fastcp.kernels import multi_lora as kern  # imports triton; dispatch turns a failure into a reason

        self.k = kern

    def unavailable_reason(self):
        if torch.cuda.is_available() or _interpreting():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"

    def refuse(self, p: LoraProblem) -> list[str]:
        """CUDA: fp32/fp16/bf16. CPU: fp32 under the interpreter, and only when FASTCP_BACKEND=triton."""
        if p.x.device.type == "cuda":
            reasons = common_refusals(p, devices=("cuda",), dtypes=_GPU_DTYPES)
        elif not _interpreting():
            return [f"x is on {p.x.device.type}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)"]
        elif os.environ.get("FASTCP_BACKEND") != "triton":
            # The interpreter is a correctness tool, never the fast path: CPU inputs go to cpp/reference.
            return ["CPU tensors run the Triton interpreter only when FASTCP_BACKEND=triton forces it"]
        else:
            reasons = common_refusals(p, devices=("cpu",), dtypes=(torch.float32,))
            if p.x.dtype in _GPU_DTYPES and p.x.dtype != torch.float32:
                reasons.append("the Triton interpreter computes 16-bit tl.dot wrongly; CPU inputs must be float32")
        for name in ("weight", "bias", "lora_a", "lora_b", "row_gates"):
            t = getattr(p, name)
            if t is not None and (t.dtype != p.x.dtype or t.device != p.x.device):
                reasons.append(f"{name} is {t.dtype} on {t.device}, x is {p.x.dtype} on {p.x.device}")
        if p.mode not in ("all", "routed", "dense"):
            reasons.append(f"mode {p.mode!r} not in all/routed/dense")
        if p.mode == "routed" and (p.row_ids is None or p.row_ids.dtype not in (torch.int32, torch.int64)):
            reasons.append("mode routed needs integer row_ids")
        elif p.mode == "routed" and p.row_ids.device != p.x.device:
            reasons.append(f"row_ids is on {p.row_ids.device}, x on {p.x.device}")
        if p.mode == "dense" and p.row_gates is None:
            reasons.append("mode dense needs row_gates")
        return reasons

    # -------------------------------------------------------------- problem layout
    def _layout(self, p: LoraProblem):
        """(segments, rank R of the low-rank space, scale [K] fp32, row gates [M, K] or None)."""
        M, IN, OUT, K, r = p.shape
        scale = p.scale.to(device=p.x.device, dtype=torch.float32).contiguous()
        if p.mode == "routed":
            return self.k.routed_segments(p.row_ids, K), r, scale, None
        gates = p.row_gates if p.mode == "dense" else None
        return self.k.stacked_segments(M, p.x.device), K * r, scale, gates

    # -------------------------------------------------------------- forward / backward
    def forward(self, p: LoraProblem) -> torch.Tensor:
        """y [M, out] = x Wᵀ + b + Σ_k g[m,k] s_k (x A_kᵀ) B_kᵀ."""
        k = self.k
        M, IN, OUT, K, r = p.shape
        segs, R, scale, gates = self._layout(p)
        S0 = k.shrink(p.x, p.lora_a, segs, R, r)
        B = p.lora_b
        return k.fused(p.x, p.weight, (p.weight.stride(0), p.weight.stride(1)), p.bias, S0, B,
                       (B.stride(0), B.stride(1), B.stride(2)), scale, gates, segs, OUT, R, r, p.x.dtype)

    def backward(self, p: LoraProblem, dy: torch.Tensor, need_dx: bool, need_da: bool, need_db: bool,
                 need_dg: bool):
        """(dx [M, in], dA [K, r, in], dB [K, out, r], dg [M, K] — dense/all only) for the needs asked."""
        k = self.k
        M, IN, OUT, K, r = p.shape
        if dy.shape != (M, OUT):
            raise ValueError(f"dy: expected [{M}, {OUT}], got {list(dy.shape)}")
        dy = dy.contiguous()
        segs, R, scale, gates = self._layout(p)
        A, B = p.lora_a, p.lora_b
        need_dg = need_dg and p.mode != "routed"
        S0 = k.shrink(p.x, A, segs, R, r) if (need_db or need_dg) else None
        # empty is enough: the reductions write every element, zeros for an adapter with no rows
        db = torch.empty_like(B) if need_db else None
        U0, db_done = None, False
        if need_dx or need_da or need_dg or need_db:
            U0, db_done = k.dy_pass(dy, B, S0, scale, gates, segs, R, r, db=db)
        if need_db and not db_done:
            k.outer(S0, dy, scale, gates, segs, db, (db.stride(0), db.stride(1), db.stride(2)), OUT, R, r)
        dx = da = dg = None
        if need_dx:
            # dx[m, i] = Σ_o dy[m, o] W[o, i] + Σ_j (g ⊙ U0)[m, j] A_seg[j, i]: the fused GEMM with W's strides
            # swapped (w[n=i, k=o]) and A read as q[n=i, j]
            dx = k.fused(dy, p.weight, (p.weight.stride(1), p.weight.stride(0)), None, U0, A,
                         (A.stride(0), A.stride(2), A.stride(1)), scale, gates, segs, IN, R, r, p.x.dtype)
        if need_da:
            da = torch.empty_like(A)
            k.outer(U0, p.x, scale, gates, segs, da, (da.stride(0), da.stride(2), da.stride(1)), IN, R, r)
        if need_dg:
            dg = (U0 * S0).view(M, K, r).sum(-1).mul_(scale[None, :]).to(p.x.dtype)
        return dx, da, db, dg
