"""C++ CPU backend: ``fastcp._C`` ops (csrc/multi_lora_cpu.cpp), routed and dense/all modes."""
from __future__ import annotations

import torch

from fastcp.ops.backends.base import Backend, LoraProblem, common_refusals


def register_fake_kernels() -> None:
    """Shape-only ("fake") implementations of the fastcp ops, so torch.compile can trace them.

    A gradient that was not asked for comes back as an empty [0] tensor, as the kernels return it.
    """
    lib = "fastcp::"
    if getattr(register_fake_kernels, "done", False):
        return

    @torch.library.register_fake(lib + "lora_routed_forward")
    def _routed_fwd(x, weight, bias, A, B, scale, row_ids):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake(lib + "lora_dense_forward")
    def _dense_fwd(x, weight, bias, A, B, scale, gates):
        return x.new_empty(x.shape[0], weight.shape[0])

    def grads(x, A, B, need_dx, need_da, need_db):
        none = x.new_empty(0)
        return (x.new_empty(x.shape) if need_dx else none, A.new_empty(A.shape) if need_da else none,
                B.new_empty(B.shape) if need_db else none)

    @torch.library.register_fake(lib + "lora_routed_backward")
    def _routed_bwd(x, weight, A, B, scale, row_ids, dy, need_dx, need_da, need_db):
        return grads(x, A, B, need_dx, need_da, need_db)

    @torch.library.register_fake(lib + "lora_dense_backward")
    def _dense_bwd(x, weight, A, B, scale, gates, dy, need_dx, need_da, need_db, need_dg):
        dg = gates.new_empty(gates.shape) if need_dg else x.new_empty(0)
        return (*grads(x, A, B, need_dx, need_da, need_db), dg)

    register_fake_kernels.done = True


class CppBackend(Backend):
    name = "cpp"

    def __init__(self):
        import fastcp._C  # noqa: F401  (loads the op registrations)

        register_fake_kernels()
        self.ops = torch.ops.fastcp

    def refuse(self, p: LoraProblem) -> list[str]:
        return common_refusals(p, devices=("cpu",), dtypes=(torch.float32, torch.float64, torch.bfloat16))

    def forward(self, p: LoraProblem) -> torch.Tensor:
        if p.mode == "routed":
            return self.ops.lora_routed_forward(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p.row_ids)
        return self.ops.lora_dense_forward(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p.gates())

    def backward(self, p, dy, need_dx, need_da, need_db, need_dg):
        if p.mode == "routed":
            dx, da, db = self.ops.lora_routed_backward(p.x, p.weight, p.lora_a, p.lora_b, p.scale, p.row_ids, dy,
                                                       need_dx, need_da, need_db)
            dg = None
        else:
            dx, da, db, dg = self.ops.lora_dense_backward(p.x, p.weight, p.lora_a, p.lora_b, p.scale, p.gates(),
                                                          dy, need_dx, need_da, need_db, need_dg)
        return (dx if need_dx else None, da if need_da else None, db if need_db else None,
                dg if need_dg else None)
