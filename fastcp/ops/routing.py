"""Routing plans: what every fused LoRA layer of one model forward needs, built once on the device.

A UNet forward runs dozens of LoRA layers on the same batch with the same per-sample routing, but
each layer sees a different number of rows per sample (tokens: 4096, 1024, 77, ...). So the plan
is *per sample*; a layer with L rows per sample (row m = b·L + l, the layout of a contiguous
[B, L, in] activation) derives its row view arithmetically inside the kernels:

    row segment s   = rows [bounds[s]·L, bounds[s+1]·L) of the grouped row order
    grouped row p   = order[p // L] · L + p % L          (p // L: the p-th sample in group order)
    gate of row m   = coef[m // L, k]

Nothing is sorted, counted, expanded or copied per layer, and nothing reads a device value on the
host (vLLM's ``LoRAKernelMeta`` is the model; the difference is that one plan serves layers of any
token count). Built with ``routing_plan`` (or ``fastcp.nn.lora_routing``), consumed by
``fastcp.ops.multi_lora_linear(..., plan=...)``.

Modes:

- ``all``    every adapter on for every sample with gate 1 (g = 1);
- ``routed`` one adapter per sample, ``ids[b]`` in [-1, K) (-1 = base model only, g = one_hot);
- ``dense``  per-sample coefficients ``coef`` [B, K] (g = coef; differentiable).

Routed segments 0..K-1 hold the samples of adapter k in ascending sample order (a stable sort of
the ids once per plan; skipped when the caller promises sorted ids, as the DC engine does), and
segment K the base-only samples. Bounds come from ``searchsorted`` on the sorted keys, not from
``bincount`` (which sizes its output from the data: a device→host sync on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("all", "routed", "dense")


@dataclass(eq=False)
class RoutingPlan:
    """Per-sample routing of one batch over K adapter slots (see the module docstring).

    mode: "all" | "routed" | "dense".   batch: B.   num_adapters: K.
    ids    [B] int32, -1 = base only (routed; else None).
    order  [B] int32, samples grouped by segment (routed; None when ``presorted``: the identity).
    bounds int32 sample offsets: [K+2] routed (segment s = order[bounds[s]:bounds[s+1]], s = K the
           base-only samples) or [2] = (0, B) for all/dense (one segment of every sample).
    coef   [B, K] (dense; any float dtype, read per sample by the kernels; gradients flow to it).
    source: the (adapter_ids, coef) objects the plan was built from, so a layer can tell whether a
           plan still describes its routing attributes (identity, not value, comparison: no sync).
    """

    mode: str
    batch: int
    num_adapters: int
    bounds: Tensor
    ids: Tensor | None = None
    order: Tensor | None = None
    coef: Tensor | None = None
    presorted: bool = False
    source: tuple = field(default=(None, None), repr=False)

    @property
    def device(self) -> torch.device:
        return self.bounds.device

    @property
    def stacked(self) -> bool:
        """All/dense: the K adapters act as one stacked pair of rank K·r over one segment."""
        return self.mode != "routed"

    def row_ids(self, rows_per_sample: int) -> Tensor:
        """[B·L] int64 per-row adapter ids (routed), for backends that want rows (reference, cpp).
        ``repeat_interleave`` with ``output_size``: no device→host sync."""
        L = int(rows_per_sample)
        return self.ids.long().repeat_interleave(L, output_size=self.batch * L)

    def row_gates(self, rows_per_sample: int, dtype: torch.dtype) -> Tensor:
        """[B·L, K] per-row gates g (ones / one-hot / coef), differentiable with respect to ``coef``."""
        B, K, L = self.batch, self.num_adapters, int(rows_per_sample)
        if self.mode == "dense":
            g = self.coef.to(dtype)
        elif self.mode == "routed":
            ids = self.ids.long()
            g = torch.zeros(B, K + 1, dtype=dtype, device=self.device)
            g.scatter_(1, torch.where(ids < 0, K, ids)[:, None], 1.0)  # column K collects the -1 rows
            g = g[:, :K]
        else:
            g = torch.ones(B, K, dtype=dtype, device=self.device)
        return g[:, None, :].expand(B, L, K).reshape(B * L, K)


def _check_ids(ids: Tensor, K: int) -> None:
    """Value check of routed ids, once per plan. CPU: a real check (a CPU tensor read is no stream
    sync). CUDA or while compiling: a device-side assert (no host sync; fails at the next sync)."""
    bad = (ids < -1) | (ids >= K)
    msg = f"adapter_ids: values must be in [-1, {K - 1}]"
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if ids.numel() and bool(bad.any()):
            raise ValueError(msg)
    else:
        torch._assert_async(~bad.any(), msg)


def routing_plan(batch: int, num_adapters: int, *, adapter_ids: Tensor | None = None, coef: Tensor | None = None,
                 device=None, presorted: bool = False, validate: bool = True) -> RoutingPlan:
    """Build the plan of one batch: B = ``batch`` samples over K = ``num_adapters`` slots.

    adapter_ids [B] integer (-1 = base only) → routed; coef [B, K] float → dense; neither → all.
    ``presorted=True`` promises that the ids are already grouped in ascending order with the -1
    samples last (e.g. [0, 0, 2, 2, -1]): the sort is skipped and the kernels read rows in place.
    A wrong promise gives wrong results, so it is for callers that lay rows out themselves.
    """
    B, K = int(batch), int(num_adapters)
    if K < 1:
        raise ValueError(f"num_adapters: expected >= 1, got {K}")
    if coef is not None and adapter_ids is not None:
        raise ValueError("coef: give coef or adapter_ids, not both")
    if coef is not None:
        if not torch.is_tensor(coef) or tuple(coef.shape) != (B, K) or not coef.is_floating_point():
            raise ValueError(f"coef: expected a float tensor [B={B}, K={K}], got "
                             f"{getattr(coef, 'dtype', type(coef))} {list(getattr(coef, 'shape', []))}")
        dev = coef.device
        return RoutingPlan("dense", B, K, _whole(B, dev), coef=coef, source=(None, coef))
    if adapter_ids is not None:
        if (not torch.is_tensor(adapter_ids) or tuple(adapter_ids.shape) != (B,)
                or adapter_ids.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"adapter_ids: expected integer [B={B}], got "
                             f"{getattr(adapter_ids, 'dtype', type(adapter_ids))} {list(getattr(adapter_ids, 'shape', []))}")
        if validate:
            _check_ids(adapter_ids, K)
        dev = adapter_ids.device
        ids = adapter_ids.to(torch.int32)
        key = torch.where(ids < 0, torch.full_like(ids, K), ids)  # base-only samples last
        if presorted:
            order, skey = None, key
        else:
            skey, perm = torch.sort(key, stable=True)
            order = perm.to(torch.int32)
        # bounds[s] = first position whose key >= s: segment s is [bounds[s], bounds[s+1])
        bounds = torch.searchsorted(skey, torch.arange(K + 2, dtype=torch.int32, device=dev), out_int32=True)
        return RoutingPlan("routed", B, K, bounds, ids=ids, order=order, presorted=presorted,
                           source=(adapter_ids, None))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return RoutingPlan("all", B, K, _whole(B, dev))


_WHOLE: dict[tuple[int, torch.device], Tensor] = {}


def _whole(B: int, device) -> Tensor:
    """bounds (0, B) of the one segment of all / dense plans, generated on the device (no host→device
    copy) and cached per (B, device): a layer without routing builds its plan for free. Not cached while
    torch.compile traces (a traced value must not leak into a global) or while a CUDA graph is captured
    (its memory belongs to the graph's pool)."""
    device = torch.device(device)
    key = (int(B), device)
    t = _WHOLE.get(key)
    if t is not None:
        return t
    t = torch.arange(2, dtype=torch.int32, device=device) * B
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and len(_WHOLE) < 256:
        _WHOLE[key] = t
    return t
