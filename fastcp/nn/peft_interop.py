"""Run an existing peft LoRA model through fastcp's fused op, unchanged otherwise.

``fuse_peft_model(model)`` swaps the ``forward`` of every peft ``lora.Linear`` for one that calls
``fastcp.ops.multi_lora_linear`` with the layer's own adapter weights (stacked per call, so
gradients reach peft's parameters and the state_dict does not change):

- active adapters (no ``adapter_names``): all of them at once, gate 1 each (peft sums them);
- a mixed batch (``adapter_names=[...]`` per sample, "__base__" = no adapter): the routed path,
  one adapter per sample, instead of peft's Python loop over sub-batches.

Cases the fused op does not model fall back to peft's own forward: adapters disabled or merged,
DoRA or other variants, active dropout (p > 0 in training mode), non-Linear layers.
``unfuse_peft_model`` restores peft's forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from fastcp.ops import multi_lora_linear

_ORIGINAL = "_fastcp_original_forward"


def _dropout_active(layer, names) -> bool:
    return any(isinstance(layer.lora_dropout[n], torch.nn.Dropout) and layer.lora_dropout[n].p > 0
               and layer.training for n in names)


def _fused_forward(self, x, *args, **kwargs):
    adapter_names = kwargs.get("adapter_names")
    original = getattr(self, _ORIGINAL)
    if self.disable_adapters or self.merged or args or set(kwargs) - {"adapter_names"}:
        return original(x, *args, **kwargs)
    if adapter_names is None:
        names = [a for a in self.active_adapters if a in self.lora_A]
        ids = None
    else:
        self._check_forward_args(x, adapter_names=adapter_names)
        names = sorted({n for n in adapter_names if n != "__base__"})
        ids = torch.tensor([names.index(n) if n != "__base__" else -1 for n in adapter_names], device=x.device)
    if not names or any(n in self.lora_variant for n in names) or _dropout_active(self, names):
        return original(x, *args, **kwargs)
    base = self.get_base_layer()
    weights_a = [self.lora_A[n].weight for n in names]
    weights_b = [self.lora_B[n].weight for n in names]
    dtype = weights_a[0].dtype
    if any(w.dtype != dtype for w in weights_a + weights_b) or base.weight.dtype != dtype:
        return original(x, *args, **kwargs)
    r = max(w.shape[0] for w in weights_a)
    # Adapters of smaller rank are zero-padded (their padded rows/columns contribute nothing).
    lora_a = torch.stack([F.pad(w, (0, 0, 0, r - w.shape[0])) for w in weights_a])
    lora_b = torch.stack([F.pad(w, (0, r - w.shape[1])) for w in weights_b])
    scaling = torch.tensor([float(self.scaling[n]) for n in names], device=x.device)
    in_dtype = x.dtype
    y = multi_lora_linear(x.to(dtype), base.weight, base.bias, lora_a, lora_b, scaling, adapter_ids=ids)
    return y.to(in_dtype)


def fuse_peft_model(model: torch.nn.Module) -> int:
    """Route every peft LoRA ``Linear`` of ``model`` through the fused op; returns how many."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, PeftLoraLinear) and not hasattr(module, _ORIGINAL):
            setattr(module, _ORIGINAL, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    if count == 0:
        raise ValueError("model: no peft LoRA Linear layer found (is it a peft LoRA model?)")
    return count


def unfuse_peft_model(model: torch.nn.Module) -> None:
    """Undo ``fuse_peft_model``."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            module.forward = getattr(module, _ORIGINAL)
            delattr(module, _ORIGINAL)
