"""C++ CPU backend: ``fastcp._C`` ops (csrc/multi_lora_cpu.cpp), routed and dense/all modes.

The ops are defined with TORCH_LIBRARY (csrc/registration.cpp). Here they get what torch.compile
and autograd need: fake kernels (shapes only) and autograd formulas (``register_autograd``), so
``apply`` is one differentiable registered op per call, traced by torch.compile without a break.
"""
from __future__ import annotations

import torch

from fastcp.ops.backends.base import Backend, DispatchKey, LoraProblem, common_refusals

_LIB = "fastcp::"


def _opt(t):
    # the kernels return an empty [0] tensor for a gradient not asked for
    return t if t is not None and t.numel() else None


def register_fake_kernels() -> None:
    """Shape-only ("fake") kernels and autograd formulas of the fastcp._C ops (once per process).

    A gradient that was not asked for comes back as an empty [0] tensor, as the kernels return it.
    """
    if getattr(register_fake_kernels, "done", False):
        return

    @torch.library.register_fake(_LIB + "lora_routed_forward")
    def _routed_fwd(x, weight, bias, A, B, scale, row_ids):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake(_LIB + "lora_dense_forward")
    def _dense_fwd(x, weight, bias, A, B, scale, gates):
        return x.new_empty(x.shape[0], weight.shape[0])

    def grads(x, A, B, need_dx, need_da, need_db):
        none = x.new_empty(0)
        return (x.new_empty(x.shape) if need_dx else none, A.new_empty(A.shape) if need_da else none,
                B.new_empty(B.shape) if need_db else none)

    @torch.library.register_fake(_LIB + "lora_routed_backward")
    def _routed_bwd(x, weight, A, B, scale, row_ids, dy, need_dx, need_da, need_db):
        return grads(x, A, B, need_dx, need_da, need_db)

    @torch.library.register_fake(_LIB + "lora_dense_backward")
    def _dense_bwd(x, weight, A, B, scale, gates, dy, need_dx, need_da, need_db, need_dg):
        dg = gates.new_empty(gates.shape) if need_dg else x.new_empty(0)
        return (*grads(x, A, B, need_dx, need_da, need_db), dg)

    # Autograd: dW = dyᵀ x and db = Σ dy are generic (rare: the base weight is usually frozen).
    def _setup(ctx, inputs, output):
        x, weight, bias, A, B, scale, idx = inputs
        ctx.save_for_backward(x, weight, A, B, scale, idx)
        ctx.has_bias = bias is not None

    def _base_grads(ctx, dy, x):
        need = ctx.needs_input_grad
        dw = dy.t().mm(x) if need[1] else None
        dbias = dy.sum(0) if (ctx.has_bias and need[2]) else None
        return dw, dbias

    def _routed_backward(ctx, dy):
        x, weight, A, B, scale, row_ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx, da, db = torch.ops.fastcp.lora_routed_backward(x, weight, A, B, scale, row_ids, dy,
                                                           need[0], need[3], need[4])
        dw, dbias = _base_grads(ctx, dy, x)
        return _opt(dx), dw, dbias, _opt(da), _opt(db), None, None

    def _dense_backward(ctx, dy):
        x, weight, A, B, scale, gates = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx, da, db, dg = torch.ops.fastcp.lora_dense_backward(x, weight, A, B, scale, gates, dy,
                                                              need[0], need[3], need[4], need[6])
        dw, dbias = _base_grads(ctx, dy, x)
        return _opt(dx), dw, dbias, _opt(da), _opt(db), None, _opt(dg)

    torch.library.register_autograd(_LIB + "lora_routed_forward", _routed_backward, setup_context=_setup)
    torch.library.register_autograd(_LIB + "lora_dense_forward", _dense_backward, setup_context=_setup)
    register_fake_kernels.done = True


class CppBackend(Backend):
    name = "cpp"

    def __init__(self):
        import fastcp._C  # noqa: F401  (loads the op registrations)

        register_fake_kernels()
        self.ops = torch.ops.fastcp

    def refuse(self, key: DispatchKey) -> list[str]:
        return common_refusals(key, devices=("cpu",), dtypes=(torch.float32, torch.float64, torch.bfloat16))

    def apply(self, x, weight, bias, lora_a, lora_b, scale, plan, rows_per_sample):
        if plan.mode == "routed":
            return self.ops.lora_routed_forward(x, weight, bias, lora_a, lora_b, scale, plan.row_ids(rows_per_sample))
        # per-row gates: an expand of the per-sample coef, so dcoef is the op's per-row dg summed by autograd
        return self.ops.lora_dense_forward(x, weight, bias, lora_a, lora_b, scale,
                                           plan.row_gates(rows_per_sample, x.dtype))

    def forward(self, p: LoraProblem) -> torch.Tensor:
        with torch.no_grad():
            return self.apply(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p.plan, p.rows_per_sample)

    def backward(self, p, dy, need_dx, need_da, need_db, need_dg):
        if p.mode == "routed":
            dx, da, db = self.ops.lora_routed_backward(p.x, p.weight, p.lora_a, p.lora_b, p.scale,
                                                       p.plan.row_ids(p.rows_per_sample), dy, need_dx, need_da, need_db)
            dg = None
        else:
            dx, da, db, dg = self.ops.lora_dense_backward(p.x, p.weight, p.lora_a, p.lora_b, p.scale, p.gates(),
                                                          dy, need_dx, need_da, need_db, need_dg)
        return (dx if need_dx else None, da if need_da else None, db if need_db else None,
                dg if need_dg else None)
