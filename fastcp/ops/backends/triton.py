"""Triton backend: fused base GEMM + LoRA (``fastcp.kernels.multi_lora``), modes routed, dense and all.

Runs on CUDA tensors (fp32/bf16/fp16, fp32 accumulation), or on CPU tensors under
``TRITON_INTERPRET=1`` (fp32 only: the interpreter's bf16 ``tl.dot`` is wrong) when the backend is
forced (``backend="triton"`` / ``FASTCP_BACKEND=triton``) — the interpreter is a correctness tool,
never a fast path.

Registered ops (``torch.library``; ``triton_op`` on a GPU, so torch.compile traces the kernels into
its graph and a step captures in a CUDA graph; in the interpreter a ``custom_op`` with a fake kernel,
because wrap_triton does not take interpreted kernels):

    fastcp::lora_triton_forward(x, W, b?, A, B, scale, order?, bounds, coef?, L, routed) -> (y, S)
    fastcp::lora_triton_backward(dy, x, W, A, B, scale, S, order?, bounds, coef?, L, routed,
                                 need_dx, need_da, need_db, need_dcoef) -> (dx, dA, dB, dcoef)

with autograd on the forward. The plan tensors (order, bounds, coef) come from the per-forward
routing plan: no layer sorts, counts, expands or syncs.

Forward:   S0 = x A_segᵀ (shrink), then y = x Wᵀ + b + (g ⊙ S0) B_segᵀ in one GEMM whose output tiles
           add the LoRA term before their single write. S0 (fp32 [M, R], R = r or K·r) is returned and
           saved for backward: R ≪ in, so keeping it costs far less memory traffic than re-reading x.
Backward:  one pass over dy for U0 = dy B_seg, dB = Σ dyᵀ (g ⊙ S0) (when its partials are cheaper than a
           second dy read) and dg[m, k] = s_k Σ_{j ∈ k} U0[m, j] S0[m, j] (dense / all), then
           dx = dy W + (g ⊙ U0) A_seg (the second and last read of dy), dA = Σ (g ⊙ U0)ᵀ x (split-K).
           dcoef[b, k] = Σ_{l < L} dg[b·L + l, k].
Here g[m, j] = s_k · coef[m // L, k] for the adapter k of low-rank column j (routed: s_k of the row's segment).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fastcp.ops.backends.base import Backend, DispatchKey, LoraProblem, common_refusals

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fastcp.kernels.multi_lora, bound once by _register(): the op bodies (traced by torch.compile on a GPU)
# then read a module global instead of executing an import statement
_K = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _segments(k, order, bounds, K, B, L, routed):
    if routed:
        return k.routed_segments(order, bounds, K, B, L)
    return k.stacked_segments(bounds, B, L)


def _layout(k, x, weight, lora_a, order, bounds, rows_per_sample: int, routed: bool):
    """(IN, OUT, K, r, B, L, segments, R) of a problem: B samples of L rows; R = r routed (one
    adapter per row), K·r otherwise."""
    K, r = lora_a.shape[0], lora_a.shape[1]
    L = rows_per_sample
    B = x.shape[0] // L if L else 0
    segs = _segments(k, order, bounds, K, B, L, routed)
    return x.shape[1], weight.shape[0], K, r, B, L, segs, (r if routed else K * r)


def _forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: Tensor,
                  order: Optional[Tensor], bounds: Tensor, coef: Optional[Tensor], rows_per_sample: int,
                  routed: bool) -> tuple[Tensor, Tensor]:
    k = _K
    _, OUT, K, r, _, _, segs, R = _layout(k, x, weight, lora_a, order, bounds, rows_per_sample, routed)
    S = k.shrink(x, lora_a, segs, R, r)
    y = k.fused(x, weight, (weight.stride(0), weight.stride(1)), bias, S, lora_b,
                (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)), scale, coef, segs, OUT, R, r, x.dtype)
    return y, S


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor, S: Tensor,
                   order: Optional[Tensor], bounds: Tensor, coef: Optional[Tensor], rows_per_sample: int, routed: bool,
                   need_dx: bool, need_da: bool, need_db: bool, need_dcoef: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    k = _K
    IN, OUT, K, r, B, L, segs, R = _layout(k, x, weight, lora_a, order, bounds, rows_per_sample, routed)
    A, Bm = lora_a, lora_b
    need_dcoef = need_dcoef and coef is not None and not routed
    # a gradient not asked for is a fresh empty [0] tensor (outputs of a custom op must not alias)
    none = lambda: x.new_empty(0)  # noqa: E731
    # empty is enough: the reductions write every element, zeros for an adapter with no rows
    db = torch.empty_like(Bm) if need_db else None
    dx, da, dcoef = none(), none(), none()
    if need_dx or need_da or need_db or need_dcoef:
        U0, db_done, dg = k.dy_pass(dy, Bm, S, scale, coef, segs, R, r, db=db, num_adapters=K, with_dg=need_dcoef)
        if need_db and not db_done:
            k.outer(S, dy, scale, coef, segs, db, (db.stride(0), db.stride(1), db.stride(2)), OUT, R, r)
        if need_dx:
            # dx[m, i] = Σ_o dy[m, o] W[o, i] + Σ_j (g ⊙ U0)[m, j] A_seg[j, i]: the fused GEMM with W's strides
            # swapped (w[n=i, k=o]) and A read as q[n=i, j]
            dx = k.fused(dy, weight, (weight.stride(1), weight.stride(0)), None, U0, A,
                         (A.stride(0), A.stride(2), A.stride(1)), scale, coef, segs, IN, R, r, x.dtype)
        if need_da:
            da = torch.empty_like(A)
            k.outer(U0, x, scale, coef, segs, da, (da.stride(0), da.stride(2), da.stride(1)), IN, R, r)
        if need_dcoef:
            dcoef = dg.view(B, L, K).sum(1).to(coef.dtype)
    return dx, da, db if db is not None else none(), dcoef


def _fake_forward(x, weight, bias, lora_a, lora_b, scale, order, bounds, coef, rows_per_sample, routed):
    K, r = lora_a.shape[0], lora_a.shape[1]
    R = r if routed else K * r
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], R, dtype=torch.float32)


def _fake_backward(dy, x, weight, lora_a, lora_b, scale, S, order, bounds, coef, rows_per_sample, routed,
                   need_dx, need_da, need_db, need_dcoef):
    need_dcoef = need_dcoef and coef is not None and not routed
    return (x.new_empty(x.shape if need_dx else (0,)), lora_a.new_empty(lora_a.shape if need_da else (0,)),
            lora_b.new_empty(lora_b.shape if need_db else (0,)),
            coef.new_empty(coef.shape) if need_dcoef else x.new_empty(0))


def _register():
    """Define fastcp::lora_triton_forward/backward (once per process) with fake kernels and autograd."""
    global _K
    if getattr(_register, "done", False):
        return
    from fastcp.kernels import multi_lora

    _K = multi_lora
    if _interpreting():
        fwd = torch.library.custom_op("fastcp::lora_triton_forward", mutates_args=())(_forward_impl)
        bwd = torch.library.custom_op("fastcp::lora_triton_backward", mutates_args=())(_backward_impl)
        fwd.register_fake(_fake_forward)
        bwd.register_fake(_fake_backward)
    else:
        # triton_op: torch.compile traces the body (wrap_triton launches) into its graph; its fake
        # implementation is the body itself run on fake tensors
        fwd = torch.library.triton_op("fastcp::lora_triton_forward", mutates_args=())(_forward_impl)
        bwd = torch.library.triton_op("fastcp::lora_triton_backward", mutates_args=())(_backward_impl)

    def setup(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scale, order, bounds, coef, L, routed = inputs
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, output[1], order, bounds, coef)
        ctx.L, ctx.routed, ctx.has_bias = L, routed, bias is not None

    def backward(ctx, dy, _dS):
        x, weight, lora_a, lora_b, scale, S, order, bounds, coef = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx, da, db, dcoef = torch.ops.fastcp.lora_triton_backward(
            dy, x, weight, lora_a, lora_b, scale, S, order, bounds, coef, ctx.L, ctx.routed,
            need[0], need[3], need[4], need[8])
        dw = dy.t().mm(x) if need[1] else None
        dbias = dy.sum(0) if (ctx.has_bias and need[2]) else None
        return (dx if need[0] else None, dw, dbias, da if need[3] else None, db if need[4] else None,
                None, None, None, dcoef if (need[8] and coef is not None and not ctx.routed) else None, None, None)

    fwd.register_autograd(backward, setup_context=setup)
    _register.done = True


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        from fastcp.kernels import multi_lora as kern  # imports triton; dispatch turns a failure into a reason

        self.k = kern
        _register()

    def unavailable_reason(self):
        if torch.cuda.is_available() or _interpreting():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"

    def refuse(self, key: DispatchKey) -> list[str]:
        """CUDA: fp32/fp16/bf16. CPU: fp32 under the interpreter, and only when forced."""
        if key.device_type == "cuda":
            reasons = common_refusals(key, devices=("cuda",), dtypes=_GPU_DTYPES)
        elif not _interpreting():
            return [f"x is on {key.device_type}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)"]
        elif key.forced != "triton":
            # The interpreter is a correctness tool, never the fast path: CPU inputs go to cpp/reference.
            return ["CPU tensors run the Triton interpreter only when forced (backend='triton' or FASTCP_BACKEND=triton)"]
        else:
            reasons = common_refusals(key, devices=("cpu",), dtypes=(torch.float32,))
            if key.dtype in _GPU_DTYPES and key.dtype != torch.float32:
                reasons.append("the Triton interpreter computes 16-bit tl.dot wrongly; CPU inputs must be float32")
        if key.mode not in ("all", "routed", "dense"):
            reasons.append(f"mode {key.mode!r} not in all/routed/dense")
        return reasons

    def apply(self, x, weight, bias, lora_a, lora_b, scale, plan, rows_per_sample):
        y, _ = torch.ops.fastcp.lora_triton_forward(
            x, weight, bias, lora_a, lora_b, scale, plan.order, plan.bounds, plan.coef, int(rows_per_sample),
            plan.mode == "routed")
        return y

    # -------------------------------------------------------------- raw kernels (tests, benchmarks)
    def _args(self, p: LoraProblem):
        plan = p.plan
        return (p.scale.to(device=p.x.device, dtype=torch.float32).contiguous(), plan.order, plan.bounds, plan.coef,
                p.rows_per_sample, plan.mode == "routed")

    def forward(self, p: LoraProblem) -> torch.Tensor:
        """y [M, out] = x Wᵀ + b + Σ_k g[m,k] s_k (x A_kᵀ) B_kᵀ."""
        scale, order, bounds, coef, L, routed = self._args(p)
        return _forward_impl(p.x, p.weight, p.bias, p.lora_a, p.lora_b, scale, order, bounds, coef, L, routed)[0]

    def backward(self, p: LoraProblem, dy: torch.Tensor, need_dx: bool, need_da: bool, need_db: bool,
                 need_dg: bool):
        """(dx [M, in], dA [K, r, in], dB [K, out, r], dg [M, K] — dense/all only) for the needs asked.

        dg is the gradient of the per-sample gates (per row here, where each row is a sample) — for mode
        "all" the gradient with respect to gates of 1."""
        M, IN, OUT, K, r = p.shape
        if dy.shape != (M, OUT):
            raise ValueError(f"dy: expected [{M}, {OUT}], got {list(dy.shape)}")
        scale, order, bounds, coef, L, routed = self._args(p)
        if p.mode == "all" and need_dg:
            # gates of one: dg is dcoef at coef = 1
            coef = torch.ones(p.plan.batch, K, dtype=p.x.dtype, device=p.x.device)
        _, S = _forward_impl(p.x, p.weight, None, p.lora_a, p.lora_b, scale, order, bounds, coef, L, routed)
        dx, da, db, dg = _backward_impl(dy.contiguous(), p.x, p.weight, p.lora_a, p.lora_b, scale, S, order, bounds,
                                        coef, L, routed, need_dx, need_da, need_db, need_dg and not routed)
        return (dx if need_dx else None, da if need_da else None, db if need_db else None,
                dg if need_dg and not routed else None)
