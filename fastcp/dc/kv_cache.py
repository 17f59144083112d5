"""Cross-attention K/V computed once per concept instead of once per (image, concept, timestep) row.

In a DC batch every row of concept k attends to the same prompt, so ``to_k(c_k)`` and
``to_v(c_k)`` are the same for all N·T rows of that concept. ``CachedCrossAttnProcessor``
replaces diffusers' processor on the cross-attention modules (``attn2``; ``attn1`` too in a block
built with ``only_cross_attention``, tiny v2 at 16x16) for the duration of a
call: the UNet receives the compact conditioning [K, L, D] (one row per concept), the processor
projects it once per module — with the LoRA slot of each concept, so adapters on to_k/to_v stay
exact — caches [K, L, C] keys/values for the whole call, and gathers them per row.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastcp.nn import MultiLoRALinear, lora_routing


class CachedCrossAttnProcessor:
    """Attention processor for diffusers' ``Attention`` used as cross-attention.

    ``row_concept`` [rows] (long) maps each row of the current UNet batch to its concept;
    ``concept_adapter_ids`` [K] routes concept k's K/V projection to LoRA slot k (or None).
    The math follows diffusers' AttnProcessor2_0 (SDPA), with K/V taken from the cache.
    """

    def __init__(self):
        self.row_concept: torch.Tensor | None = None
        self.concept_adapter_ids: torch.Tensor | None = None
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._plans: dict = {}  # routing plans of the concept rows, built once per call, shared by every module

    def clear(self) -> None:
        self._cache.clear()
        self._plans = {}

    def _kv(self, attn, context: torch.Tensor):
        key = id(attn)
        if key not in self._cache:
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            lora = [m for m in (attn.to_k, attn.to_v) if isinstance(m, MultiLoRALinear)]
            route = (lora_routing(lora, adapter_ids=self.concept_adapter_ids, plans=self._plans)
                     if lora and self.concept_adapter_ids is not None else contextlib.nullcontext())
            with route as plans:
                if plans:
                    self._plans.update(plans)
                self._cache[key] = (attn.to_k(context), attn.to_v(context))
        return self._cache[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or self.row_concept is None:
            raise RuntimeError("CachedCrossAttnProcessor serves cross-attention of a DC call only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        rows = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key_c, value_c = self._kv(attn, encoder_hidden_states)  # [K, L, C]
        head_dim = key_c.shape[-1] // attn.heads
        # Gather per row as views of [K, heads, L, d]; SDPA broadcasts nothing here, so index.
        key = key_c.view(key_c.shape[0], -1, attn.heads, head_dim).transpose(1, 2)[self.row_concept]
        value = value_c.view(value_c.shape[0], -1, attn.heads, head_dim).transpose(1, 2)[self.row_concept]
        query = query.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(unet) -> dict[str, object]:
    """The ``Attention`` modules of a diffusers UNet that attend to the text (``is_cross_attention``:
    every ``attn2``, and ``attn1`` of an ``only_cross_attention`` block), by name."""
    return {n: m for n, m in unet.named_modules()
            if hasattr(m, "set_processor") and getattr(m, "is_cross_attention", False)}


@contextlib.contextmanager
def cached_cross_attention(unet, processor: CachedCrossAttnProcessor):
    """Install ``processor`` on every cross-attention module for the duration; restore after."""
    mods = cross_attention_modules(unet)
    saved = {n: m.processor for n, m in mods.items()}
    try:
        for m in mods.values():
            m.set_processor(processor)
        yield processor
    finally:
        for n, m in mods.items():
            m.set_processor(saved[n])
        processor.clear()
