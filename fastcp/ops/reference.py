"""Plain-torch reference of the fused ops: the specification and the CPU fallback.

Every other backend is tested against these functions, forward and every gradient.
"""
from __future__ import annotations

import torch


def lora_gates(batch: int, num_adapters: int, coef, adapter_ids, *, dtype, device) -> torch.Tensor:
    """Per-sample adapter gates ``g`` [B, K].

    ``g = coef`` if given; else ``one_hot(adapter_ids)`` with a zero row for id -1; else all ones.
    """
    if coef is not None:
        return coef.to(dtype)
    if adapter_ids is not None:
        g = torch.zeros(batch, num_adapters, dtype=dtype, device=device)
        active = adapter_ids >= 0
        rows = torch.arange(batch, device=device)[active]
        g[rows, adapter_ids[active]] = 1
        return g
    return torch.ones(batch, num_adapters, dtype=dtype, device=device)


def multi_lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, *, coef=None, adapter_ids=None):
    """Reference multi-adapter LoRA linear.

    Shapes: x [B, ..., in], weight [out, in], bias [out] or None, lora_a [K, r, in],
    lora_b [K, out, r], scaling float or [K], coef [B, K], adapter_ids [B] (long, -1 = base only).

    Equivalent PyTorch code (this *is* it)::

        y[b, ...] = x[b, ...] @ weight.T + bias
                    + sum_k g[b, k] * scaling[k] * (x[b, ...] @ lora_a[k].T) @ lora_b[k].T
    """
    B, K = x.shape[0], lora_a.shape[0]
    g = lora_gates(B, K, coef, adapter_ids, dtype=x.dtype, device=x.device)
    if not torch.is_tensor(scaling):
        scaling = torch.full((K,), float(scaling), dtype=x.dtype, device=x.device)
    g = g * scaling.to(x.dtype)  # [B, K]
    y = torch.nn.functional.linear(x, weight, bias)
    xf = x.reshape(B, -1, x.shape[-1])  # [B, L, in]
    s = torch.einsum("bli,kri->blkr", xf, lora_a)  # shrink: [B, L, K, r]
    s = s * g[:, None, :, None]
    delta = torch.einsum("blkr,kor->blo", s, lora_b)  # expand: [B, L, out]
    return y + delta.reshape(y.shape)


@torch.no_grad()
def merge_lora_reference_(weight, lora_a, lora_b, scaling, mask=None, *, sign: float = 1.0):
    """In place ``weight += sign * scaling * mask ⊙ (lora_b @ lora_a)``, accumulated in fp32.

    weight [out, in]; lora_a [r, in]; lora_b [out, r]; mask [out, in] or None. ``sign=-1`` unmerges.
    """
    delta = (lora_b.float() @ lora_a.float()) * float(scaling)
    if mask is not None:
        delta = delta * mask.float()
    weight.copy_((weight.float() + sign * delta).to(weight.dtype))
    return weight
