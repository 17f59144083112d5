"""``multi_lora_linear``: a linear layer plus K LoRA adapters mixed per sample, with autograd.

Forward (rows m = flattened (b, ...) positions, L rows per sample, g = coef | one_hot(adapter_ids) | 1):

    y[m] = x[m] Wᵀ + b + Σ_k g[m // L, k] · s_k · (x[m] A_kᵀ) B_kᵀ

Backward, with S_k = x A_kᵀ [M, r], U_k = dy B_k [M, r], G[m, k] = g[m // L, k]·s_k:

    dx  = dy W + Σ_k G[:, k] ⊙ U_k A_k
    dA_k = (G[:, k] ⊙ U_k)ᵀ x          dB_k = (G[:, k] ⊙ dy)ᵀ S_k
    dcoef[b, k] = s_k Σ_{m ∈ b} ⟨U_k[m], S_k[m]⟩
    dW  = dyᵀ x                         db  = Σ_m dy[m]

The routing (``adapter_ids`` / ``coef``) becomes a per-sample ``RoutingPlan`` (``fastcp.ops.routing``):
built here when a call passes ids or coef, or built once per model forward by
``fastcp.nn.lora_routing`` and passed in as ``plan=`` by every layer. Per call there is no host
sync: no value reads of device tensors, no data-dependent output sizes, no host→device copies
(a float ``scaling`` is filled on the device). The backend is resolved once per (device, dtype,
mode, rank) and cached (``fastcp.ops.dispatch``); each backend's ``apply`` is a torch.library op
with a fake kernel and autograd, so ``torch.compile(fullgraph=True)`` traces through it.
"""
from __future__ import annotations

import torch

from fastcp.ops import dispatch
from fastcp.ops.routing import RoutingPlan, routing_plan


def _validate(x, weight, bias, lora_a, lora_b, scaling):
    """Shapes, dtypes and devices only: metadata, never values (no sync)."""
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"x: expected a tensor [B, ..., in], got {getattr(x, 'shape', type(x))}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected [out, in={x.shape[-1]}], got {list(weight.shape)}")
    out, inn = weight.shape
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bias: expected [{out}], got {list(bias.shape)}")
    if lora_a.dim() != 3 or lora_a.shape[2] != inn:
        raise ValueError(f"lora_a: expected [K, r, in={inn}], got {list(lora_a.shape)}")
    K, r = lora_a.shape[:2]
    if tuple(lora_b.shape) != (K, out, r):
        raise ValueError(f"lora_b: expected [K={K}, out={out}, r={r}], got {list(lora_b.shape)}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} differs from x's {x.dtype}/{x.device}")
    if torch.is_tensor(scaling):
        if scaling.dim() > 1 or (scaling.dim() == 1 and scaling.shape[0] != K):
            raise ValueError(f"scaling: expected a float or [K={K}], got {list(scaling.shape)}")


def _scale(scaling, K: int, device) -> torch.Tensor:
    """scaling as a contiguous fp32 [K] tensor on x's device. A float is filled on the device (a fill
    kernel, not a host→device copy of a CPU tensor on every call)."""
    if torch.is_tensor(scaling):
        s = scaling.to(device=device, dtype=torch.float32).reshape(-1).expand(K)
        return s if s.is_contiguous() else s.contiguous()
    return torch.full((K,), float(scaling), dtype=torch.float32, device=device)


@torch.compiler.assume_constant_result
def _backend_name(device_type: str, dtype: torch.dtype, mode: str, rank: int, backend) -> str:
    # a constant while torch.compile traces (resolved once, outside the graph)
    return dispatch.resolve(device_type, dtype, mode, rank, backend).name


def multi_lora_linear(x, weight, bias, lora_a, lora_b, scaling, *, coef=None, adapter_ids=None,
                      plan: RoutingPlan | None = None, backend: str | None = None):
    """Linear layer with K LoRA adapters mixed per sample (DESIGN.md section 3).

    Args:
        x: [B, ..., in]. weight: [out, in]. bias: [out] or None.
        lora_a: [K, r, in]. lora_b: [K, out, r]. scaling: float or [K].
        coef: [B, K] per-sample mixing coefficients (broadcast over the middle dims), or
        adapter_ids: [B] long, one adapter per sample, -1 = base model only.
        Neither: every adapter with coefficient 1.
        plan: a ``RoutingPlan`` for B samples and K adapters (instead of coef / adapter_ids): what
            every layer of one model forward shares (``fastcp.nn.lora_routing`` builds it once).
        backend: force a backend ("triton", "cuda", "cpp", "reference"); default: FASTCP_BACKEND, else
            the first that accepts the input.
    Returns: y [B, ..., out].

    Equivalent PyTorch code: ``fastcp.ops.reference.multi_lora_linear_reference``.
    Gradients flow to every input that requires grad (x, weight, bias, lora_a, lora_b, coef).
    """
    _validate(x, weight, bias, lora_a, lora_b, scaling)
    B, K, r = x.shape[0], lora_a.shape[0], lora_a.shape[1]
    if plan is None:
        plan = routing_plan(B, K, adapter_ids=adapter_ids, coef=coef, device=x.device)
    else:
        if coef is not None or adapter_ids is not None:
            raise ValueError("plan: give a plan or coef/adapter_ids, not both")
        if plan.batch != B or plan.num_adapters != K:
            raise ValueError(f"plan: built for B={plan.batch}, K={plan.num_adapters}; the input has B={B}, K={K}")
    if plan.device != x.device:
        raise ValueError(f"plan: on {plan.device}, x on {x.device} (build the routing on x's device)")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    rows_per_sample = x2d.shape[0] // B if B else 0
    scale = _scale(scaling, K, x.device)
    name = _backend_name(x.device.type, x.dtype, plan.mode, int(r), backend)
    y = dispatch.get_backend(name).apply(x2d, weight, bias, lora_a, lora_b, scale, plan, rows_per_sample)
    return y.reshape(*lead, weight.shape[0])
