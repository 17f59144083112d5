"""Gradient checkpointing that keeps the per-call LoRA routing.

fastcp routes samples to adapters through state set on the layers for the duration of a call
(``lora_routing``, FL2T's per-layer ``coef``, the DC engine's cross-attention processor). With
gradient checkpointing a block's forward is run again during backward, after those contexts
have exited: with the stock checkpoint function the recomputation would see other routing (all
adapters on, or a batch of another size) and give wrong gradients or a shape error.

``routing_safe_checkpoint`` is the UNet's checkpoint function::

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=routing_safe_checkpoint)

At forward it records the routing of the block's MultiLoRALinear layers (ids, coef, enabled,
plan) and its attention processors (with a K/V-cache processor's per-call state), and the
recomputation runs under exactly that state (``torch.utils.checkpoint``'s ``context_fn``; RNG and
autocast are restored by checkpoint itself), then puts back whatever was there. Without it the
recompute sees the restored routing: wrong LoRA gradients, silently, or a crash for the DC
engine's compact K/V conditioning (tests/test_nn_multi_lora.py shows both).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from fastcp.nn.multi_lora import MultiLoRALinear

#: instance attributes of a MultiLoRALinear that describe its routing for the current call
ROUTING_ATTRIBUTES = ("_adapter_ids", "_coef", "enabled", "plan")
#: per-call attributes of an attention processor (the DC engine's K/V cache reuses one object)
PROCESSOR_ATTRIBUTES = ("row_concept", "concept_adapter_ids")


_ROUTED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _routed_modules(module: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """(sub-module, routing attribute names) of a block, found once per block (a module walk per
    checkpointed call would cost more than the bookkeeping it serves)."""
    found = _ROUTED.get(module)
    if found is None:
        found = []
        for m in module.modules():
            if isinstance(m, MultiLoRALinear):
                found.append((m, tuple(k for k in ROUTING_ATTRIBUTES if k in m.__dict__)))
            elif hasattr(m, "set_processor") and "processor" in m.__dict__:
                found.append((m, ("processor",)))
        _ROUTED[module] = found
    return found


def routing_state(module: nn.Module) -> list[tuple[object, dict]]:
    """[(object, {attribute: value})] of every routed layer, attention module (its processor) and
    processor (its per-call attributes) in ``module``."""
    state = []
    for m, names in _routed_modules(module):
        attrs = {k: m.__dict__[k] for k in names}
        state.append((m, attrs))
        proc = attrs.get("processor")
        if proc is not None and any(hasattr(proc, a) for a in PROCESSOR_ATTRIBUTES):
            state.append((proc, {a: getattr(proc, a) for a in PROCESSOR_ATTRIBUTES if hasattr(proc, a)}))
    return state


@contextlib.contextmanager
def routing_restored(state: list[tuple[object, dict]]):
    """Apply a recorded routing state for the duration (plain attribute writes: no plan is rebuilt,
    and set_processor's logging and module re-registration are skipped)."""
    current = [(m, {k: m.__dict__.get(k) for k in attrs}) for m, attrs in state]
    try:
        for m, attrs in state:
            m.__dict__.update(attrs)
        yield
    finally:
        for m, attrs in current:
            m.__dict__.update(attrs)


def routing_safe_checkpoint(module: nn.Module, *args):
    """diffusers' ``gradient_checkpointing_func(module, *args)``: non-reentrant checkpoint whose
    recomputation sees the routing ``module`` had at forward."""
    state = routing_state(module)
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), routing_restored(state)))
