"""C++ CPU backend: ``fastcp._C`` ops (csrc/multi_lora_cpu.cpp), routed and dense/all modes."""
from __future__ import annotations

import torch

from fastcp.ops.backends.base import Backend, LoraProblem, common_refusals


class CppBackend(Backend):
    name = "cpp"

    def __init__(self):
        import fastcp._C  # noqa: F401  (loads the op registrations)

        self.ops = torch.ops.fastcp

    def refuse(self, p: LoraProblem) -> list[str]:
        return common_refusals(p, devices=("cpu",), dtypes=(torch.float32, torch.float64, torch.bfloat16))

    def _gates(self, p: LoraProblem) -> torch.Tensor:
        return p.row_gates if p.mode == "dense" else p.gates()

    def forward(self, p: LoraProblem) -> torch.Tensor:
        if p.mode == "routed":
            return self.ops.lora_routed_forward(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p.row_ids)
        return self.ops.lora_dense_forward(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, self._gates(p))

    def backward(self, p, dy, need_dx, need_da, need_db, need_dg):
        if p.mode == "routed":
            dx, da, db = self.ops.lora_routed_backward(p.x, p.weight, p.lora_a, p.lora_b, p.scale, p.row_ids, dy,
                                                       need_dx, need_da, need_db)
            dg = None
        else:
            dx, da, db, dg = self.ops.lora_dense_backward(p.x, p.weight, p.lora_a, p.lora_b, p.scale, self._gates(p),
                                                          dy, need_dx, need_da, need_db, need_dg)
        return (dx if need_dx else None, da if need_da else None, db if need_db else None,
                dg if need_dg else None)
