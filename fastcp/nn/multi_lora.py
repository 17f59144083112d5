"""MultiLoRALinear: an nn.Linear with K LoRA adapter slots run through ``fastcp.ops.multi_lora_linear``.

Per-sample routing (``adapter_ids`` [B] or ``coef`` [B, K]) is not a forward argument of the
UNet, so it is set on the layers by the ``lora_routing`` context manager (or per call through
``MultiLoRALinear.forward(x, adapter_ids=..., coef=...)``). ``lora_routing`` builds one
``RoutingPlan`` (``fastcp.ops.routing``) for the whole model and hands it to every layer: the ids
are validated, grouped and counted once per forward, on the device, and every layer reuses that in
its forward and backward. Setting a layer's ``adapter_ids`` / ``coef`` attribute directly (as FL2T
does per layer) drops the shared plan for that layer, which then builds its own from the attributes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Sequence

import torch
from torch import nn

from fastcp import ops
from fastcp.ops.routing import RoutingPlan, routing_plan

# Attention projections of diffusers' Attention blocks (self- and cross-attention).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Cross-attention keys/values only (C-LoRA / Custom Diffusion): the K/V projections of every
# Attention module that attends to the text (diffusers' ``Attention.is_cross_attention``). That is
# ``attn2`` in a standard transformer block, and ``attn1`` too in a block built with
# ``only_cross_attention`` (tiny v2 at 16x16). A "cross:" target matches only in such modules.
CROSS_KV_TARGETS = ("cross:to_k", "cross:to_v")
FEEDFORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")


class MultiLoRALinear(nn.Module):
    """``y = base(x) + sum_k g[b,k] * scaling[k] * (x @ A_k^T) @ B_k^T`` with K adapter slots.

    Parameters: ``lora_a`` [K, r, in] (Kaiming-uniform init like peft), ``lora_b`` [K, out, r]
    (zeros, so a fresh slot is the identity). Slots may have different ranks: a slot of rank
    r_k < r keeps rows r_k.. of A and columns r_k.. of B at zero; their gradients are zero too,
    so they stay zero under any optimizer without weight decay on them.
    ``scaling`` [K] buffer = alpha_k / r_k.
    """

    def __init__(self, base: nn.Linear, num_adapters: int = 1, rank: int = 4, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base: expected nn.Linear, got {type(base).__name__}")
        if num_adapters < 1 or rank < 1:
            raise ValueError(f"num_adapters and rank must be >= 1, got {num_adapters}, {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.zeros(num_adapters, rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(num_adapters, self.out_features, rank, dtype=w.dtype, device=w.device))
        self.register_buffer("scaling", torch.ones(num_adapters, dtype=torch.float32, device=w.device))
        self.register_buffer("ranks", torch.full((num_adapters,), rank, dtype=torch.long, device=w.device))
        for k in range(num_adapters):
            self.reset_adapter(k, rank=rank, alpha=alpha if alpha is not None else rank)
        # Routing state set by `lora_routing`; None/None means every slot is on for every sample.
        self._adapter_ids: torch.Tensor | None = None
        self._coef: torch.Tensor | None = None
        self.plan: RoutingPlan | None = None  # the shared plan of adapter_ids/coef (None: build per call)
        self.enabled = True

    # Setting the routing attributes directly invalidates a shared plan (it described the old values).
    @property
    def adapter_ids(self) -> torch.Tensor | None:
        return self._adapter_ids

    @adapter_ids.setter
    def adapter_ids(self, value):
        self._adapter_ids, self.plan = value, None

    @property
    def coef(self) -> torch.Tensor | None:
        return self._coef

    @coef.setter
    def coef(self, value):
        self._coef, self.plan = value, None

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    @torch.no_grad()
    def reset_adapter(self, k: int, *, rank: int | None = None, alpha: float | None = None) -> None:
        """Re-initialise slot k: A Kaiming-uniform on its first ``rank`` rows, B = 0."""
        rank = self.rank if rank is None else rank
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank: slot rank must be in 1..{self.rank}, got {rank}")
        alpha = float(rank if alpha is None else alpha)
        self.lora_a[k].zero_()
        a = torch.empty(rank, self.in_features, dtype=torch.float32, device=self.lora_a.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_a[k, :rank] = a.to(self.lora_a.dtype)
        self.lora_b[k].zero_()
        self.ranks[k] = rank
        self.scaling[k] = alpha / rank

    def delta_weight(self, k: int) -> torch.Tensor:
        """ΔW_k = scaling_k · B_k A_k, shape [out, in] (fp32)."""
        return self.scaling[k] * (self.lora_b[k].float() @ self.lora_a[k].float())

    @torch.no_grad()
    def merge_adapter_(self, k: int, mask: torch.Tensor | None = None, reset: bool = True) -> None:
        """Fold slot k into the frozen base weight (W += scaling_k · mask ⊙ B_k A_k, fp32
        accumulation) and, by default, re-initialise the slot for the next task."""
        ops.merge_lora_(self.base.weight, self.lora_a[k], self.lora_b[k], float(self.scaling[k]), mask=mask)
        if reset:
            self.reset_adapter(k, rank=int(self.ranks[k]), alpha=float(self.scaling[k] * self.ranks[k]))

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None, coef: torch.Tensor | None = None):
        """y [B, ..., out] for x [B, ..., in]. Routing: the per-call ``adapter_ids`` [B] / ``coef`` [B, K]
        (a plan of its own), else the shared plan of ``lora_routing``, else the layer's attributes."""
        if not self.enabled:
            return self.base(x)
        plan = None
        if adapter_ids is None and coef is None:
            if self.plan is not None and self.plan.batch == x.shape[0]:
                plan = self.plan
            else:
                adapter_ids, coef = self._adapter_ids, self._coef
        weight, bias, lora_a, lora_b = self.base.weight, self.base.bias, self.lora_a, self.lora_b
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            # Like nn.Linear under autocast: compute in the autocast dtype, keep fp32 parameters
            # (the casts are differentiable, so gradients reach them in fp32). coef keeps its dtype:
            # the kernels read it per sample and accumulate in fp32.
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight, lora_a, lora_b = x.to(dt), weight.to(dt), lora_a.to(dt), lora_b.to(dt)
            bias = bias.to(dt) if bias is not None else None
        # scaling is an fp32 device buffer: no per-call conversion or copy
        return ops.multi_lora_linear(x, weight, bias, lora_a, lora_b, self.scaling, coef=coef,
                                     adapter_ids=adapter_ids, plan=plan)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.num_adapters}, rank={self.rank}"


def matches_target(model: nn.Module, name: str, targets: Sequence[str]) -> bool:
    """Whether module ``name`` of ``model`` is a LoRA target: its qualified name ends with one of
    ``targets``; a ``"cross:<suffix>"`` target also needs the parent Attention to be cross-attention."""
    for t in targets:
        cross = t.startswith("cross:")
        suffix = t[len("cross:"):] if cross else t
        if name == suffix or name.endswith("." + suffix):
            if not cross:
                return True
            parent_name = name.rpartition(".")[0]
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, "is_cross_attention", False):
                return True
    return False


def inject_multi_lora(
    model: nn.Module,
    num_adapters: int = 1,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = ATTENTION_TARGETS,
) -> dict[str, MultiLoRALinear]:
    """Replace every nn.Linear of ``model`` whose qualified name ends with one of ``targets`` by a
    MultiLoRALinear wrapping it (in place). Freezes the base weights. Returns {name: layer}."""
    found: dict[str, MultiLoRALinear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".base" not in name and matches_target(model, name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module.weight.requires_grad_(False)
            if module.bias is not None:
                module.bias.requires_grad_(False)
            layer = MultiLoRALinear(module, num_adapters=num_adapters, rank=rank, alpha=alpha)
            setattr(parent, child, layer)
            found[name] = layer
    if not found:
        raise ValueError(f"targets: no nn.Linear in the model matches {list(targets)}")
    return found


def lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """All MultiLoRALinear layers of a model, by qualified name (of the replaced linear)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


@contextlib.contextmanager
def lora_routing(model_or_layers, *, adapter_ids: torch.Tensor | None = None, coef: torch.Tensor | None = None,
                 enabled: bool = True, presorted: bool = False, plans: dict | None = None):
    """Route samples to adapter slots in every MultiLoRALinear of a model for the duration.

    adapter_ids [B] long (-1 = base only) or coef [B, K]; both None = all slots on.
    ``enabled=False`` runs the base model only. Restores the previous routing on exit.

    Builds the routing plan once (per distinct slot count K among the layers; usually one) on the
    ids' / coef's device: ids are validated and grouped here, not in every layer. ``presorted=True``
    promises ids grouped in ascending order with -1 last (see ``fastcp.ops.routing_plan``).
    Yields the plans by K ({K: RoutingPlan}); pass them back as ``plans=`` to reuse them for the
    same routing on other layers (the DC engine's K/V projections do) instead of building again.
    """
    layers: Iterable[MultiLoRALinear]
    if isinstance(model_or_layers, nn.Module):
        layers = list(lora_layers(model_or_layers).values())
    else:
        layers = list(model_or_layers)
    reuse = plans or {}
    plans: dict[int, RoutingPlan] = {}

    def plans_given(K):
        p = reuse.get(K)
        return p if p is not None and p.source[0] is adapter_ids and p.source[1] is coef else None  # identity: no sync

    if enabled and (adapter_ids is not None or coef is not None):
        batch = adapter_ids.shape[0] if adapter_ids is not None else coef.shape[0]
        for l in layers:
            K = l.num_adapters
            if K not in plans and plans_given(K) is not None:
                plans[K] = plans_given(K)
            elif K not in plans:
                plans[K] = routing_plan(batch, K, adapter_ids=adapter_ids, coef=coef, presorted=presorted)
    saved = [(l._adapter_ids, l._coef, l.enabled, l.plan) for l in layers]
    try:
        for l in layers:
            l._adapter_ids, l._coef, l.enabled = adapter_ids, coef, enabled
            l.plan = plans.get(l.num_adapters)
        yield plans
    finally:
        for l, (a, c, e, p) in zip(layers, saved):
            l._adapter_ids, l._coef, l.enabled, l.plan = a, c, e, p
