"""Weight-space merges of LoRA deltas (no autograd: they edit frozen weights in place)."""
from __future__ import annotations

import torch

from fastcp.ops.reference import merge_lora_reference_


def _check_merge(weight, lora_a, lora_b, mask):
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [out, in], got {list(weight.shape)}")
    out, inn = weight.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != inn:
        raise ValueError(f"lora_a: expected [r, in={inn}], got {list(lora_a.shape)}")
    if tuple(lora_b.shape) != (out, lora_a.shape[0]):
        raise ValueError(f"lora_b: expected [out={out}, r={lora_a.shape[0]}], got {list(lora_b.shape)}")
    if mask is not None and tuple(mask.shape) != (out, inn):
        raise ValueError(f"mask: expected [{out}, {inn}], got {list(mask.shape)}")


def merge_lora_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """In place ``weight += scaling * mask ⊙ (lora_b @ lora_a)`` with fp32 accumulation.

    weight [out, in], lora_a [r, in], lora_b [out, r], mask [out, in] (0/1 or any weights) or None.
    """
    _check_merge(weight, lora_a, lora_b, mask)
    return merge_lora_reference_(weight, lora_a, lora_b, scaling, mask, sign=1.0)


def unmerge_lora_(weight, lora_a, lora_b, scaling, mask=None) -> torch.Tensor:
    """The inverse of ``merge_lora_``: ``weight -= scaling * mask ⊙ (lora_b @ lora_a)``."""
    _check_merge(weight, lora_a, lora_b, mask)
    return merge_lora_reference_(weight, lora_a, lora_b, scaling, mask, sign=-1.0)


def magmax_merge(task_vectors: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Elementwise max-|τ| merge: out[i] = τ_{n*}[i] with n* = argmax_n |τ_n[i]| (ties: first task).

    task_vectors: a list of same-shape tensors or a stacked tensor [N, ...]. Returns [...] .
    """
    tv = torch.stack(list(task_vectors)) if not torch.is_tensor(task_vectors) else task_vectors
    if tv.dim() < 1 or tv.shape[0] == 0:
        raise ValueError("task_vectors: need at least one task vector")
    idx = tv.abs().argmax(dim=0, keepdim=True)
    return tv.gather(0, idx).squeeze(0)
