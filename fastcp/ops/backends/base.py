"""The backend interface of the fused multi-LoRA op.

``fastcp.ops.multi_lora_linear`` flattens x [B, ..., in] to rows [M = B·L, in], takes (or builds) the
per-sample routing plan (``fastcp.ops.routing``) and hands both to the backend that dispatch
resolved for (device, dtype, mode, rank). A backend's ``apply`` is differentiable: it calls the
backend's registered torch ops (``torch.library``: fake kernels and autograd attached), so the op
traces under ``torch.compile(fullgraph=True)`` and never syncs with the host.

``forward``/``backward`` on a ``LoraProblem`` are the raw kernels without autograd, for tests and
benchmarks of one backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastcp.ops.routing import RoutingPlan, routing_plan


@dataclass(frozen=True)
class DispatchKey:
    """What backend choice depends on: resolved once per key and cached (``fastcp.ops.dispatch``)."""

    device_type: str
    dtype: torch.dtype
    mode: str
    rank: int
    forced: str | None = None   # the backend forced by ``backend=`` / FASTCP_BACKEND, if any


@dataclass
class LoraProblem:
    """One multi-LoRA linear on 2-D rows. M = rows = B·L (B samples of L rows each).

    Either a ``plan`` (per sample) with ``rows_per_sample`` L, or, for tests that think in rows,
    ``row_ids`` / ``row_gates`` per row (then every row is its own sample: L = 1).
    """

    x: Tensor                   # [M, in], contiguous
    weight: Tensor              # [out, in]
    bias: Tensor | None         # [out]
    lora_a: Tensor              # [K, r, in]
    lora_b: Tensor              # [K, out, r]
    scale: Tensor               # [K] float32 (scaling per adapter)
    mode: str                   # "all" (every adapter, gate 1), "routed", "dense"
    row_ids: Tensor | None = None    # [M] integer, -1 = no adapter; mode "routed", L = 1
    row_gates: Tensor | None = None  # [M, K]; mode "dense", L = 1
    plan: RoutingPlan | None = None
    rows_per_sample: int = 1

    def __post_init__(self):
        if self.plan is None:
            M, K = self.x.shape[0], self.lora_a.shape[0]
            if self.mode == "routed":
                self.plan = routing_plan(M, K, adapter_ids=self.row_ids)
            elif self.mode == "dense":
                self.plan = routing_plan(M, K, coef=self.row_gates)
            else:
                self.plan = routing_plan(M, K, device=self.x.device)
            self.rows_per_sample = 1

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(M, in, out, K, r)."""
        return (self.x.shape[0], self.x.shape[1], self.weight.shape[0], self.lora_a.shape[0], self.lora_a.shape[1])

    def gates(self) -> Tensor:
        """Dense per-row gates g [M, K] for any mode (one-hot rows for routed, zero for id -1)."""
        return self.plan.row_gates(self.rows_per_sample, self.x.dtype)

    def key(self, forced: str | None = None) -> DispatchKey:
        return DispatchKey(self.x.device.type, self.x.dtype, self.mode, int(self.lora_a.shape[1]), forced)


class Backend:
    """A way to run the fused op. Subclasses override the methods below."""

    name = "base"

    def unavailable_reason(self) -> str | None:
        """None when this backend can run in this process, else why not."""
        return None

    def refuse(self, key: DispatchKey) -> list[str]:
        """Reasons this backend cannot take inputs of ``key``; [] means it accepts."""
        return []

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: Tensor,
              plan: RoutingPlan, rows_per_sample: int) -> Tensor:
        """Differentiable y [M, out] for rows x [M, in] (M = plan.batch · rows_per_sample)."""
        raise NotImplementedError

    def forward(self, p: LoraProblem) -> Tensor:
        """y [M, out] = x Wᵀ + b + Σ_k g[m,k] s_k (x A_kᵀ) B_kᵀ (no autograd)."""
        raise NotImplementedError

    def backward(self, p: LoraProblem, dy: Tensor, need_dx: bool, need_da: bool, need_db: bool, need_dg: bool):
        """(dx [M,in] incl. the base part dy W, dA [K,r,in], dB [K,out,r], dg [M,K] (dense/all) or None)."""
        raise NotImplementedError


def common_refusals(key: DispatchKey, *, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Device/dtype checks most backends share."""
    reasons = []
    if key.device_type not in devices:
        reasons.append(f"x is on {key.device_type}, needs {'/'.join(devices)}")
    if key.dtype not in dtypes:
        reasons.append(f"dtype {key.dtype} not in {[str(d).replace('torch.', '') for d in dtypes]}")
    return reasons
