"""The one home of the forward-diffusion arithmetic every loss and metric uses.

    x_t    = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε
    target = ε                               (epsilon prediction)
           = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0      (v prediction)
    SNR(t) = ᾱ_t / (1 − ᾱ_t)

Same arithmetic, in the same order and dtype, as diffusers' ``DDPMScheduler.add_noise`` and
``get_velocity``, so results do not depend on which one a caller used; unlike them the timesteps
may have any shape that broadcasts against the leading dimensions of ``noise`` (e.g. [T] against
noise [N, T, C, H, W] in the batched DC passes, viewed as [1, T]).
"""
from __future__ import annotations

import torch


def _alpha_terms(scheduler, t: torch.Tensor, like: torch.Tensor, lead: tuple[int, ...] | None = None):
    acp = scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    sqrt_a = acp ** 0.5
    sqrt_1ma = (1 - acp) ** 0.5
    shape = tuple(t.shape) if lead is None else lead
    view = (*shape, *([1] * (like.dim() - len(shape))))
    return sqrt_a.reshape(view), sqrt_1ma.reshape(view)


def noisy_input_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                           prediction_type: str = "epsilon", *, t_shape: tuple[int, ...] | None = None):
    """(x_t, target) for L_diff.

    x0 [..., C, H, W] broadcasting against noise [..., C, H, W]; t long with ``t_shape`` (default
    its own shape) = the leading dims of noise it indexes (e.g. x0 [N, 1, C, H, W], noise
    [N, T, C, H, W], t [T] with t_shape (1, T)).
    """
    sqrt_a, sqrt_1ma = _alpha_terms(scheduler, t, noise, t_shape)
    x_t = sqrt_a * x0 + sqrt_1ma * noise
    if prediction_type == "v_prediction":
        return x_t, sqrt_a * noise - sqrt_1ma * x0
    if prediction_type != "epsilon":
        raise ValueError(f"prediction_type: fastcp trains epsilon or v_prediction models, got {prediction_type!r}")
    return x_t, noise


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-γ loss weights [B] (Hang et al. 2023, as diffusers' training scripts apply them):
    min(SNR(t), γ) / SNR(t) for epsilon prediction, min(SNR(t), γ) / (SNR(t) + 1) for v prediction."""
    acp = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    snr = acp / (1 - acp)
    clipped = torch.clamp(snr, max=float(gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
