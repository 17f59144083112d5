"""The backend interface of the fused multi-LoRA op.

The autograd Function (``fastcp/ops/multi_lora.py``) flattens x [B, ..., in] to rows, turns the
per-sample ``adapter_ids`` / ``coef`` into per-row ``row_ids`` / ``row_gates`` and hands a
``LoraProblem`` to the first backend that accepts it. Backends compute only what is specific to
LoRA; dW and db (rare: the base weight is usually frozen) are done generically by the Function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastcp.ops.reference import lora_gates


@dataclass
class LoraProblem:
    """One multi-LoRA linear on 2-D rows. M = rows (batch × middle dims flattened)."""

    x: Tensor                   # [M, in], contiguous
    weight: Tensor              # [out, in]
    bias: Tensor | None         # [out]
    lora_a: Tensor              # [K, r, in]
    lora_b: Tensor              # [K, out, r]
    scale: Tensor               # [K] float32 (scaling per adapter)
    mode: str                   # "all" (every adapter, gate 1), "routed" (row_ids), "dense" (row_gates)
    row_ids: Tensor | None = None    # [M] int32/int64, -1 = no adapter; mode "routed"
    row_gates: Tensor | None = None  # [M, K] in x.dtype; mode "dense"

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(M, in, out, K, r)."""
        return (self.x.shape[0], self.x.shape[1], self.weight.shape[0], self.lora_a.shape[0], self.lora_a.shape[1])

    def gates(self) -> Tensor:
        """Dense per-row gates g [M, K] for any mode (one-hot rows for routed, zero for id -1)."""
        M, _, _, K, _ = self.shape
        return lora_gates(M, K, self.row_gates, self.row_ids, dtype=self.x.dtype, device=self.x.device)


class Backend:
    """A way to run LoraProblems. Subclasses override the four methods below."""

    name = "base"

    def unavailable_reason(self) -> str | None:
        """None when this backend can run in this process, else why not."""
        return None

    def refuse(self, p: LoraProblem) -> list[str]:
        """Reasons this backend cannot take ``p``; [] means it accepts."""
        return []

    def forward(self, p: LoraProblem) -> Tensor:
        """y [M, out] = x Wᵀ + b + Σ_k g[m,k] s_k (x A_kᵀ) B_kᵀ."""
        raise NotImplementedError

    def backward(self, p: LoraProblem, dy: Tensor, need_dx: bool, need_da: bool, need_db: bool, need_dg: bool):
        """(dx [M,in] incl. the base part dy W, dA [K,r,in], dB [K,out,r], dg [M,K] or None)."""
        raise NotImplementedError


def common_refusals(p: LoraProblem, *, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Device/dtype checks most backends share."""
    reasons = []
    if p.x.device.type not in devices:
        reasons.append(f"x is on {p.x.device.type}, needs {'/'.join(devices)}")
    if p.x.dtype not in dtypes:
        reasons.append(f"dtype {p.x.dtype} not in {[str(d).replace('torch.', '') for d in dtypes]}")
    return reasons
