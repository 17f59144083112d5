"""``dsc`` / ``dsc_ewc``: function-space regularisation with DC scores (Jha et al. 2024).

DESIGN.md section 6. Task n, x ∈ D_n, candidates {c_0..c_n} (c_0 = concept n's prior prompt),
"old" = the model before task n, "new" = the model being trained::

    L = L_diff
        + δ · CE( DC logits_new over {c_0..c_n}, c_n )
        + α · KL( p_old(· | x) ‖ p_new(· | x) )                over {c_0..c_{n−1}}
        + β · mean_{c < n} ‖ε_new(x_t, t, c) − ε_old(x_t, t, c)‖²
    dsc_ewc:  + (λ/2) · Σ F ⊙ (ΔW_n)²        (the EWC-DC term, see ``fastcp.methods.ewc_dc``)

    p(c | x) = softmax_c( −mean_t err(x, c, t) / τ ),  err = mean_pixels ‖ε − ε_θ(x_t, t, c)‖²

‖·‖² in the β term is the mean over pixels (the scale of L_diff), averaged over images,
old concepts and timesteps. KL uses p renormalised over the old candidates only.

Teacher and student share one batched UNet pass and one model: earlier tasks are merged into W
after each task, the current task trains slot 0, and the pass holds student rows (every
candidate, gate g[row, 0] = 1) and teacher rows (old candidates, g[row, 0] = 0 through the
fused op's ``coef``), all with the same (x_t, t, ε). The teacher rows are the model before task
n exactly, so no copy of the model is kept; their outputs are detached. Cross-attention K/V are
projected once per (prompt, gate) pair (``fastcp.dc.CachedCrossAttnProcessor``).

With the current adapter at zero (B_n = 0, the start of each task) student = teacher, so the KL
and ε terms are zero (up to float rounding between rows of one batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastcp.methods.base import Method, TaskBatch, register
from fastcp.methods.ewc_dc import DCHyperparameters, DCTermsMixin, EWCHyperparameters, EWCMixin
from fastcp.methods.hparams import NONNEG, hparam
from fastcp.models.backbone import Conditioning
from fastcp.models.noise import noisy_input_and_target
from fastcp.nn import lora_routing


def batched_predictions(unet, scheduler, latents: torch.Tensor, cond: Conditioning, timesteps: torch.Tensor,
                        noise: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One UNet pass over every (image, concept, timestep) row; returns (pred [N, K, T, C, H, W],
    target [N, T, C, H, W]).

    latents [N, C, H, W]; cond: K rows; timesteps [T]; noise [N, T, C, H, W] (shared by every
    concept); gates [K, S] coef of the S LoRA slots for concept k's rows (0/1 rows give the
    teacher/student split). x_t = √ᾱ_t x + √(1−ᾱ_t) ε once per (image, t).
    """
    from fastcp.dc import CachedCrossAttnProcessor, cached_cross_attention

    if latents.dim() != 4:
        raise ValueError(f"latents: expected [N, C, H, W], got {list(latents.shape)}")
    N, K, T = latents.shape[0], len(cond), timesteps.shape[0]
    if noise.shape != (N, T, *latents.shape[1:]):
        raise ValueError(f"noise: expected [N={N}, T={T}, {', '.join(map(str, latents.shape[1:]))}], got {list(noise.shape)}")
    if gates.dim() != 2 or gates.shape[0] != K:
        raise ValueError(f"gates: expected [K={K}, slots], got {list(gates.shape)}")
    dev = latents.device
    noisy, target = noisy_input_and_target(scheduler, latents.unsqueeze(1), noise, timesteps,
                                           scheduler.config.get("prediction_type", "epsilon"), t_shape=(1, T))
    n_idx = torch.arange(N, device=dev).repeat_interleave(K * T)
    k_idx = torch.arange(K, device=dev).repeat_interleave(T).repeat(N)
    t_idx = torch.arange(T, device=dev).repeat(N * K)
    gates = gates.to(device=dev, dtype=latents.dtype)
    # K/V of concept k are projected once with its gate: 0/1 gates map to adapter ids 0 / −1.
    if gates.shape[1] == 1 and bool(((gates == 0) | (gates == 1)).all()):
        concept_ids = torch.where(gates[:, 0] > 0, 0, -1).long()
        processor = CachedCrossAttnProcessor()
        processor.concept_adapter_ids = concept_ids
        processor.row_concept = k_idx
        kwargs = {"encoder_hidden_states": cond.encoder_hidden_states}
        if cond.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = {a: v[k_idx] for a, v in cond.added_cond_kwargs.items()}
        with cached_cross_attention(unet, processor), lora_routing(unet, coef=gates[k_idx]):
            pred = unet(noisy[n_idx, t_idx], timesteps.to(dev)[t_idx], **kwargs).sample
    else:
        with lora_routing(unet, coef=gates[k_idx]):
            pred = unet(noisy[n_idx, t_idx], timesteps.to(dev)[t_idx], **cond.select(k_idx).unet_kwargs()).sample
    return pred.view(N, K, T, *latents.shape[1:]), target


def dsc_terms(pred: torch.Tensor, target: torch.Tensor, num_old: int, temperature: float,
              reduction: str = "mean") -> dict[str, torch.Tensor]:
    """CE, KL and ε terms from one batched pass.

    pred [N, 2·num_old + 1, T, ...]: student rows (old candidates, then c_n) followed by teacher
    rows (old candidates); target [N, T, ...]. Returns {"dc_ce", "kl", "eps"}: fp32 means over the
    N images, or their sums over the images with ``reduction="sum"``.
    """
    K_s = num_old + 1
    if pred.shape[1] != K_s + num_old:
        raise ValueError(f"pred: expected {K_s + num_old} concept rows for num_old={num_old}, got {pred.shape[1]}")
    red = tuple(range(3, pred.dim()))
    err = ((pred.float() - target.unsqueeze(1).float()) ** 2).mean(dim=red)  # [N, K', T]
    logits = -err.mean(dim=2) / temperature  # [N, K']
    student, teacher = logits[:, :K_s], logits[:, K_s:].detach()
    target_idx = torch.full((pred.shape[0],), num_old, dtype=torch.long, device=pred.device)
    ce = F.cross_entropy(student, target_idx, reduction="none")
    log_new = torch.log_softmax(student[:, :num_old], dim=1)
    log_old = torch.log_softmax(teacher, dim=1)
    kl = (log_old.exp() * (log_old - log_new)).sum(dim=1)
    eps = ((pred[:, :num_old].float() - pred[:, K_s:].detach().float()) ** 2).flatten(1).mean(1)
    reduce = torch.sum if reduction == "sum" else torch.mean
    return {"dc_ce": reduce(ce), "kl": reduce(kl), "eps": reduce(eps)}


@dataclass
class DSCHyperparameters(DCHyperparameters):
    dsc_alpha: float = hparam(1.0, NONNEG, "alpha, weight of KL(p_old || p_new) over old concepts (default 1: same "
                              "order as CE)")
    dsc_beta: float = hparam(1.0, NONNEG, "beta, weight of mean ||eps_new - eps_old||^2 over old concepts (default 1: "
                             "the scale of L_diff, i.e. old prompts' predictions weigh as much as the new concept's loss)")


@dataclass
class DSCEWCHyperparameters(DSCHyperparameters, EWCHyperparameters):
    pass


@register
class DSC(DCTermsMixin, EWCMixin, Method):
    name = "dsc"
    export_form = "merged"
    hyperparameters = DSCHyperparameters
    use_ewc = False

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.use_ewc:
            self.ewc_setup()

    def dsc_pass(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """{"dc_ce", "kl", "eps"}: each averaged over the global batch's DC images (this shard's part)."""
        rows, noise = batch.dc_rows()
        if noise is None:  # this shard holds none of the DC images
            zero = torch.zeros((), device=batch.latents.device)
            return {"dc_ce": zero, "kl": zero, "eps": zero}
        x = batch.latents[rows]
        old, new = batch.dc.old, batch.dc.new
        bb = self.ctx.backbone
        cond = bb.encode_prompt(old + new)
        k_old = len(old)
        rows = torch.cat([torch.arange(k_old + 1), torch.arange(k_old)]).to(x.device)  # student, then teacher
        gates = torch.cat([torch.ones(k_old + 1, 1), torch.zeros(k_old, 1)])
        pred, target = batched_predictions(bb.unet, bb.scheduler, x, cond.select(rows), batch.dc.timesteps, noise, gates)
        sums = dsc_terms(pred, target, k_old, float(self.hp.dc_temperature), reduction="sum")
        return {k: batch.share_of_mean(v, batch.dc.rows) for k, v in sums.items()}

    def loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        hp = self.hp
        l_diff = self.diffusion_loss(batch)
        terms = self.dsc_pass(batch)
        total = l_diff + hp.dc_delta * terms["dc_ce"] + hp.dsc_alpha * terms["kl"] + hp.dsc_beta * terms["eps"]
        out = {"diff": l_diff, **terms}
        if self.use_ewc:
            out["ewc"] = self.ewc_penalty()
            total = total + out["ewc"]
        return {"loss": total, **out}

    def end_task(self, n: int) -> None:
        self.release_hooks()
        for layer in self.ctx.layers.values():
            layer.merge_adapter_(0)
        if self.use_ewc:
            self.ewc_update(n)

    def state_dict(self) -> dict:
        return self.ewc_state() if self.use_ewc else {}

    def load_state_dict(self, state: dict) -> None:
        if self.use_ewc:
            self.load_ewc_state(state)


@register
class DSCEWC(DSC):
    name = "dsc_ewc"
    hyperparameters = DSCEWCHyperparameters
    use_ewc = True
