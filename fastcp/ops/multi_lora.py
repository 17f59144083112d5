"""``multi_lora_linear``: a linear layer plus K LoRA adapters mixed per sample, with autograd.

Forward (rows m = flattened (b, ...) positions, g = coef | one_hot(adapter_ids) | 1):

    y[m] = x[m] Wᵀ + b + Σ_k g[b(m), k] · s_k · (x[m] A_kᵀ) B_kᵀ

Backward, with S_k = x A_kᵀ [M, r], U_k = dy B_k [M, r], G = g·s:

    dx  = dy W + Σ_k G[:, k] ⊙ U_k A_k
    dA_k = (G[:, k] ⊙ U_k)ᵀ x          dB_k = (G[:, k] ⊙ dy)ᵀ S_k
    dcoef[b, k] = s_k Σ_{m ∈ b} ⟨U_k[m], S_k[m]⟩
    dW  = dyᵀ x                         db  = Σ_m dy[m]

The backend (``fastcp.ops.dispatch``) computes the LoRA parts; dW and db are computed here, only
when needed (the usual case is a frozen base weight).
"""
from __future__ import annotations

import torch

from fastcp.ops import dispatch
from fastcp.ops.backends.base import LoraProblem


def _validate(x, weight, bias, lora_a, lora_b, scaling, coef, adapter_ids):
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
    if coef is not None and adapter_ids is not None:
        raise ValueError("coef: give coef or adapter_ids, not both")
    B = x.shape[0]
    if coef is not None and tuple(coef.shape) != (B, K):
        raise ValueError(f"coef: expected [B={B}, K={K}], got {list(coef.shape)}")
    if adapter_ids is not None:
        if tuple(adapter_ids.shape) != (B,) or adapter_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"adapter_ids: expected integer [B={B}], got {adapter_ids.dtype} {list(adapter_ids.shape)}")
        # a value check reads the ids (a host sync): skipped while torch.compile traces
        if not torch.compiler.is_compiling() and adapter_ids.numel() and (adapter_ids.min() < -1 or adapter_ids.max() >= K):
            raise ValueError(f"adapter_ids: values must be in [-1, {K - 1}]")


class _MultiLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a, lora_b, scale, row_gates, row_ids, mode, rows_per_sample):
        p = LoraProblem(x2d, weight, bias, lora_a, lora_b, scale, mode, row_ids, row_gates)
        backend = dispatch.choose(p)
        y = backend.forward(p)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, scale, row_gates, row_ids)
        ctx.mode, ctx.backend, ctx.has_bias, ctx.rows_per_sample = mode, backend, bias is not None, rows_per_sample
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, scale, row_gates, row_ids = ctx.saved_tensors
        p = LoraProblem(x2d, weight, None, lora_a, lora_b, scale, ctx.mode, row_ids, row_gates)
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx, da, db, dg = ctx.backend.backward(p, dy, need[0], need[3], need[4], need[6] and ctx.mode == "dense")
        dw = dy.t() @ x2d if need[1] else None
        dbias = dy.sum(0) if (ctx.has_bias and need[2]) else None
        return dx, dw, dbias, da, db, None, dg, None, None, None


def multi_lora_linear(x, weight, bias, lora_a, lora_b, scaling, *, coef=None, adapter_ids=None):
    """Linear layer with K LoRA adapters mixed per sample (DESIGN.md section 3).

    Args:
        x: [B, ..., in]. weight: [out, in]. bias: [out] or None.
        lora_a: [K, r, in]. lora_b: [K, out, r]. scaling: float or [K].
        coef: [B, K] per-sample mixing coefficients (broadcast over the middle dims), or
        adapter_ids: [B] long, one adapter per sample, -1 = base model only.
        Neither: every adapter with coefficient 1.
    Returns: y [B, ..., out].

    Equivalent PyTorch code: ``fastcp.ops.reference.multi_lora_linear_reference``.
    Gradients flow to every input that requires grad (x, weight, bias, lora_a, lora_b, coef).
    """
    _validate(x, weight, bias, lora_a, lora_b, scaling, coef, adapter_ids)
    B, K = x.shape[0], lora_a.shape[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    rows_per_sample = x2d.shape[0] // B if B else 0
    scale = scaling.float() if torch.is_tensor(scaling) else torch.full((K,), float(scaling))
    scale = scale.reshape(-1).expand(K).to(x.device).contiguous()
    row_gates = row_ids = None
    if coef is not None:
        mode = "dense"
        row_gates = coef.to(x.dtype).repeat_interleave(rows_per_sample, dim=0)
    elif adapter_ids is not None:
        mode = "routed"
        row_ids = adapter_ids.to(torch.int32).repeat_interleave(rows_per_sample, dim=0)
    else:
        mode = "all"
    y = _MultiLoRA.apply(x2d, weight, bias, lora_a, lora_b, scale, row_gates, row_ids, mode, rows_per_sample)
    return y.reshape(*lead, weight.shape[0])
