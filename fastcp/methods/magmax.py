"""``magmax``: task vectors merged by elementwise maximum magnitude (MagMax, Marczak et al. 2024).

Two variants (``--magmax_variant``), per targeted layer.

``incremental`` (default): the low-rank CP paper's ``mag_max_light`` (Deja et al. 2024; GitHub
luk-st/continual-lora, ``lora/train_dreambooth_lora_sdxl.py``). Each task trains on the *merged*
model and contributes only its own delta::

    task n trains a fresh LoRA on top of W = W0 + τ_<n;   τ_n = W_after − W_before = s·B_n A_n
    τ = magmax(τ_1, …, τ_n):  τ[i] = τ_{m*}[i],  m* = argmax_m |τ_m[i]|
    W = W0 + τ

``cumulative``: MagMax's own form. Tasks are fine-tuned in a chain (task n starts from the end of
task n−1, not from the merge), each task vector is cumulative, and the merge is only what is
evaluated and exported::

    S_n = S_{n−1} + s·B_n A_n        (the chain: task n trains on W = W0 + S_{n−1})
    τ = magmax(S_1, …, S_n);   evaluated / exported model W = W0 + τ

The elementwise max-|·| is associative, so only the running merged τ is kept (one fp32 tensor per
layer, plus W0; ``cumulative`` also keeps S). Ties (equal |·|) keep the earlier task, where the
released code keeps the later: they differ only on exact ties, e.g. entries both tasks left at 0.

``--mask_topk p`` < 1 is fastcp's addition, in neither paper's released code: before the merge it
keeps only the round(p·numel) entries of largest |τ_n| in each layer (τ_n ← M_n ⊙ τ_n).
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
    magmax_variant: str = hparam("incremental", str, "incremental: each task trains on the merged model and "
                                 "contributes its own delta (the low-rank CP paper's mag_max_light, default); "
                                 "cumulative: MagMax's chain of fine-tunings, merging the cumulative task vectors",
                                 choices=("incremental", "cumulative"))
    mask_topk: float = hparam(1.0, FRACTION, "fastcp's addition (in neither paper's released code): keep only this "
                              "top fraction of |tau_n| per layer before the max-magnitude merge (default 1.0: "
                              "nothing masked)")


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
        self.cumulative = self.hp.magmax_variant == "cumulative"
        #: cumulative: the chain's S_n = W_chain − W0 per layer
        self.chain: dict[str, torch.Tensor] = {}

    def begin_task(self, n: int) -> list[dict]:
        if self.cumulative and n > 0:  # back from the merged model (evaluated) to the chain's end
            with torch.no_grad():
                for name, layer in self.ctx.layers.items():
                    w = layer.base.weight
                    w.copy_((self.w0[name] + self.chain[name]).to(w.dtype))
        return super().begin_task(n)

    @torch.no_grad()
    def end_task(self, n: int) -> None:
        self.release_hooks()
        for name, layer in self.ctx.layers.items():
            tau_n = layer.delta_weight(0).detach()  # = W_after − W_before
            if self.cumulative:
                prev_chain = self.chain.get(name)
                self.chain[name] = tau_n if prev_chain is None else prev_chain + tau_n
                # a copy: τ may keep it, and τ and the chain must not share storage (the
                # checkpoint's safetensors writer refuses shared tensors)
                tau_n = self.chain[name].clone()
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
        return {"tau": dict(self.tau), "chain": dict(self.chain)}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.backbone.device
        self.tau = {n: v.to(dev) for n, v in state["tau"].items()}
        self.chain = {n: v.to(dev) for n, v in state.get("chain", {}).items()}
