"""``magmax``: per-task deltas merged by elementwise maximum magnitude (Marczak et al. 2024;
the "selective update" of Deja et al. 2024 with ``--mask_topk``).

DESIGN.md section 6, per targeted layer::

    task n trains a fresh LoRA on top of W = W0 + τ_<n;   τ_n = W_after − W_before = s·B_n A_n
    optional selective update (--mask_topk p):  τ_n ← M_n ⊙ τ_n,  M_n = 1 on the ⌈p·numel⌉…
        exactly round(p·numel) entries of largest |τ_n| in the layer, 0 elsewhere
    τ = magmax(τ_1, …, τ_n):  τ[i] = τ_{m*}[i],  m* = argmax_m |τ_m[i]|  (ties: earliest task)
    W = W0 + τ

The elementwise max-|·| is associative (with earliest-task ties), so only the running merged τ
is kept (one fp32 tensor per layer, plus W0), not every τ_n. With p = 1 (default) nothing is
masked: the plain MagMax merge.
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from fastcp import ops
from fastcp.methods.base import Method, register
from fastcp.methods.hparams import FRACTION, hparam


def topk_mask(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """0/1 mask (same shape and dtype as ``tau``) keeping exactly round(fraction · numel) entries
    of largest |tau| (ties broken by index order of ``torch.topk``); fraction in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected 0 < fraction <= 1, got {fraction}")
    k = int(round(fraction * tau.numel()))
    mask = torch.zeros(tau.numel(), dtype=tau.dtype, device=tau.device)
    if k > 0:
        mask[tau.abs().reshape(-1).topk(k).indices] = 1
    return mask.view_as(tau)


@dataclass
class MagMaxHyperparameters:
    mask_topk: float = hparam(1.0, FRACTION, "keep only this top fraction of |tau_n| per layer before the "
                              "max-magnitude merge (default 1.0 = plain MagMax; the selective update of Deja et al. "
                              "uses e.g. 0.1)")


@register
class MagMax(Method):
    name = "magmax"
    export_form = "dense"
    hyperparameters = MagMaxHyperparameters

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.mask_topk = float(self.hp.mask_topk)
        self.w0 = {n: l.base.weight.detach().float().clone() for n, l in ctx.layers.items()}
        self.tau: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def end_task(self, n: int) -> None:
        self.release_hooks()
        for name, layer in self.ctx.layers.items():
            tau_n = layer.delta_weight(0).detach()  # = W_after − W_before
            if self.mask_topk < 1.0:
                tau_n = tau_n * topk_mask(tau_n, self.mask_topk)
            prev = self.tau.get(name)
            self.tau[name] = tau_n if prev is None else ops.magmax_merge(torch.stack([prev, tau_n]))
            w = layer.base.weight
            w.copy_((self.w0[name] + self.tau[name]).to(w.dtype))
            layer.reset_adapter(0, rank=int(layer.ranks[0]), alpha=float(layer.scaling[0] * layer.ranks[0]))

    def dense_delta(self) -> dict[str, torch.Tensor]:
        """The merged τ per layer: W − W0 = τ (elementwise, generally of full rank)."""
        return dict(self.tau)

    def state_dict(self) -> dict:
        return {"tau": dict(self.tau)}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.backbone.device
        self.tau = {n: v.to(dev) for n, v in state["tau"].items()}
