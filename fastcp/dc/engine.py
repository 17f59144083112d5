"""Batched diffusion-classifier (DC) scores (DESIGN.md section 7).

    err[n, k, t] = mean_pixels ( target − ε_θ(√ᾱ_t·x_n + √(1−ᾱ_t)·ε_{n,t}, t, cond_k) )²

with target = ε (epsilon prediction) or v = √ᾱ_t·ε − √(1−ᾱ_t)·x (v-prediction), the **same
noise ε_{n,t} for every concept k**. Rows (image, concept, timestep) are packed into large UNet
batches: the noisy input is computed once per (image, timestep) and shared by every concept, each
prompt is encoded once by the caller, and concept k's rows are routed to LoRA slot
``adapter_ids[k]`` of the multi-adapter layers.
"""
from __future__ import annotations

import contextlib

import torch

from fastcp.models.backbone import Conditioning
from fastcp.nn import lora_layers, lora_routing


def _as_conditioning(cond) -> Conditioning:
    if isinstance(cond, Conditioning):
        return cond
    if torch.is_tensor(cond) and cond.dim() == 3:
        return Conditioning(cond)
    raise ValueError("cond: expected a Conditioning or a tensor [K, L, D]")


class DiffusionClassifier:
    """DC scores of a (LoRA-injected or plain) diffusers UNet.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (optionally with MultiLoRALinear layers).
        scheduler: its noise scheduler (``alphas_cumprod``, ``config.prediction_type``).
        temperature: τ of ``logits = −mean_t err / τ``.
    """

    def __init__(self, unet, scheduler, temperature: float = 1.0):
        self.unet, self.scheduler, self.temperature = unet, scheduler, temperature

    def _check(self, latents, cond, timesteps, noise, adapter_ids):
        if latents.dim() != 4:
            raise ValueError(f"latents: expected [N, C, H, W], got {list(latents.shape)}")
        N = latents.shape[0]
        K = len(cond)
        if timesteps.dim() != 1 or timesteps.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"timesteps: expected a 1-D integer tensor, got {timesteps.dtype} {list(timesteps.shape)}")
        T = timesteps.shape[0]
        if noise.shape == (T, *latents.shape[1:]):
            noise = noise.unsqueeze(0).expand(N, *noise.shape)
        elif noise.shape != (N, T, *latents.shape[1:]):
            raise ValueError(f"noise: expected [T, C, H, W] or [N, T, C, H, W] with T={T}, got {list(noise.shape)}")
        if adapter_ids is not None and (adapter_ids.dim() != 1 or adapter_ids.shape[0] != K):
            raise ValueError(f"adapter_ids: expected [K={K}], got {list(adapter_ids.shape)}")
        return N, K, T, noise

    def errors(self, latents: torch.Tensor, cond, timesteps: torch.Tensor, noise: torch.Tensor,
               adapter_ids: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """[N, K, T] denoising errors; see the module docstring. ``batch_size`` caps UNet rows per
        call (default: everything in one call); the result does not depend on it."""
        cond = _as_conditioning(cond)
        N, K, T, noise = self._check(latents, cond, timesteps, noise, adapter_ids)
        device = latents.device
        acp = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[timesteps.to(device)]  # [T]
        sa = acp.sqrt().view(1, T, 1, 1, 1).to(latents.dtype)
        sb = (1 - acp).sqrt().view(1, T, 1, 1, 1).to(latents.dtype)
        x = latents.unsqueeze(1)
        noisy = sa * x + sb * noise  # [N, T, C, H, W], once per (image, timestep)
        v_pred = self.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        target = sa * noise - sb * x if v_pred else noise
        # Row r = ((n * K) + k) * T + t
        rows = N * K * T
        n_idx = torch.arange(N, device=device).repeat_interleave(K * T)
        k_idx = torch.arange(K, device=device).repeat_interleave(T).repeat(N)
        t_idx = torch.arange(T, device=device).repeat(N * K)
        chunk = rows if batch_size is None else max(1, int(batch_size))
        has_lora = bool(lora_layers(self.unet))
        out = []
        for s in range(0, rows, chunk):
            n, k, t = n_idx[s : s + chunk], k_idx[s : s + chunk], t_idx[s : s + chunk]
            ids = None if adapter_ids is None else adapter_ids.to(device)[k]
            ctx = lora_routing(self.unet, adapter_ids=ids) if (has_lora and ids is not None) else contextlib.nullcontext()
            with ctx:
                pred = self.unet(noisy[n, t], timesteps.to(device)[t], **cond.select(k).unet_kwargs()).sample
            out.append(((pred.float() - target[n, t].float()) ** 2).mean(dim=(1, 2, 3)))
        return torch.cat(out).view(N, K, T)

    def logits(self, *args, **kwargs) -> torch.Tensor:
        """[N, K] = −mean_t err / τ."""
        return -self.errors(*args, **kwargs).mean(dim=2) / self.temperature

