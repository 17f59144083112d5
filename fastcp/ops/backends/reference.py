"""Reference backend: plain torch on rows, every adapter for every row (g one-hot when routed).

It is the CPU fallback and, with ``fastcp.ops.reference``, the spec the other backends match.
Plain differentiable torch: autograd and torch.compile see ordinary aten ops.
"""
from __future__ import annotations

import torch

from fastcp.ops.backends.base import Backend, LoraProblem


def _lora_rows(x, weight, bias, lora_a, lora_b, scale, gates):
    G = gates * scale.to(x.dtype)                                  # [M, K]
    s = torch.einsum("mi,kri->mkr", x, lora_a) * G[:, :, None]       # shrink, gated: [M, K, r]
    y = torch.nn.functional.linear(x, weight, bias)
    return y + torch.einsum("mkr,kor->mo", s, lora_b)               # expand


class ReferenceBackend(Backend):
    name = "reference"

    def apply(self, x, weight, bias, lora_a, lora_b, scale, plan, rows_per_sample):
        return _lora_rows(x, weight, bias, lora_a, lora_b, scale, plan.row_gates(rows_per_sample, x.dtype))

    def forward(self, p: LoraProblem) -> torch.Tensor:
        with torch.no_grad():
            return _lora_rows(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p.gates())

    def backward(self, p, dy, need_dx, need_da, need_db, need_dg):
        g = p.gates()
        G = g * p.scale.to(p.x.dtype)
        s = torch.einsum("mi,kri->mkr", p.x, p.lora_a)                # S = x Aᵀ   [M, K, r]
        u = torch.einsum("mo,kor->mkr", dy, p.lora_b)                 # U = dy B   [M, K, r]
        # Gate the [M, K, r] intermediates before contracting: a three-operand einsum such as
        # "mk,mkr,kri->mi" may be contracted pairwise through an [M, K, r, in] temporary.
        ug = u * G[:, :, None]                                        # G ⊙ U     [M, K, r]
        dx = da = db = dg = None
        if need_dx:
            dx = dy @ p.weight + ug.reshape(ug.shape[0], -1) @ p.lora_a.reshape(-1, p.lora_a.shape[2])
        if need_da:
            da = torch.einsum("mkr,mi->kri", ug, p.x)
        if need_db:
            db = torch.einsum("mo,mkr->kor", dy, s * G[:, :, None])
        if need_dg and p.mode != "routed":
            dg = (u * s).sum(-1) * p.scale.to(p.x.dtype)
        return dx, da, db, dg
