"""``ewc_dc``: EWC with a diffusion-classifier Fisher (Jha et al. 2024, parameter-space DC
regularisation), plus the DC helpers ``dsc`` shares.

DESIGN.md section 6. DC scores over the candidate concepts {c_0, c_1, …, c_n} (c_0 = concept
n's prior prompt without a token, e.g. "a photo of a star")::

    err(x, c, t) = mean_pixels ‖ε − ε_θ(√ᾱ_t x + √(1−ᾱ_t) ε, t, c)‖²     (same ε for every c)
    p_θ(c | x)   = softmax_c( −mean_t err(x, c, t) / τ )

    after task n (model merged, W ← W + s·B_n A_n):
        F_n = E_{x ∈ D_n} [ (∂ log p_θ(c_n | x) / ∂W)² ]     per element of every targeted W
        F   ← γ·F + F_n
    task n loss:
        L = L_diff + δ·CE(DC logits over {c_0..c_n}, c_n) + (λ/2)·Σ_layers Σ F ⊙ (ΔW_n)²,
        ΔW_n = s·B_n A_n (the current task's LoRA delta; earlier tasks are merged into W)

Per step the DC term uses ``--dc_images`` images of the batch, up to ``--dc_concepts``
candidates (c_0 and c_n always, the rest sampled from earlier concepts) and ``--dc_train_timesteps``
random timesteps with noise shared across concepts, all in one batched pass of the DC engine
(``fastcp.dc.DiffusionClassifier``; gradients flow to the LoRA and the concept token).

The Fisher is computed with the DC engine on every training image of D_n (``--fisher_images``
caps it), at ``--fisher_timesteps`` evenly spaced timesteps with a fixed noise per image, by
autograd to the base weights of the targeted layers (their requires_grad is switched on only for
this). Storage: F has one entry per element of every targeted weight, kept in bfloat16 (range
of fp32, ~3 significant digits: enough for a penalty weight, half of fp32). For SD 1.5 with
LoRA on the attention projections (to_q/k/v/to_out.0 of the 16 transformer blocks) that is
93.5 M entries = 187 MB in bf16 (374 MB fp32; 11 % of the 860 M UNet parameters); with the
feed-forward linears too it is 242 M entries = 485 MB; C-LoRA-style K/V only would be 19.2 M
entries = 38 MB. The tiny model's 40 targeted layers (attention + feed-forward) hold 0.33 M
entries (0.65 MB).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcp.methods.base import Method, TaskBatch, register


# --------------------------------------------------------------------------- shared DC helpers
class DCTermsMixin:
    """Candidate sampling and the DC CE term shared by ``ewc_dc`` and ``dsc``."""

    def dc_candidates(self, n: int) -> tuple[list[str], list[str]]:
        """(old prompts, [c_n's prompt]) for task n: c_0 = concept n's prior prompt, then up to
        ``dc_concepts − 2`` earlier concepts (all of them while they fit; else sampled)."""
        concepts = self.ctx.concepts
        cap = int(self.args.dc_concepts)
        earlier = list(range(n))
        if len(earlier) > max(0, cap - 2):
            perm = torch.randperm(len(earlier), generator=self.ctx.generator)[: max(0, cap - 2)]
            earlier = sorted(earlier[i] for i in perm.tolist())
        old = [concepts[n].prior_prompt] + [concepts[m].prompt for m in earlier]
        return old, [concepts[n].prompt]

    def dc_draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [N, C, H, W], timesteps [T], noise [N, T, C, H, W]) for one step's DC term."""
        x = latents[: int(self.args.dc_images)]
        T = int(self.args.dc_train_timesteps)
        n_train = self.ctx.backbone.scheduler.config.num_train_timesteps
        gen = self.ctx.generator
        ts = torch.randint(0, n_train, (T,), generator=gen).to(x.device)
        noise = torch.randn((x.shape[0], T, *x.shape[1:]), generator=gen).to(x)
        return x, ts, noise


def dc_fisher(backbone, layers: dict, prompts: list[str], target: int, images: torch.Tensor,
              timesteps: torch.Tensor, noise: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """F = mean_i (∂ log p(c_target | x_i) / ∂W)² for the base weight W of every layer (fp32).

    images [N, C, H, W] (latents); prompts: the K candidates; timesteps [T]; noise [N, T, C, H, W];
    p = softmax(DC logits / τ) from ``fastcp.dc.DiffusionClassifier`` (one image per backward,
    since the Fisher needs per-sample gradients).
    """
    from fastcp.dc import DiffusionClassifier

    if not 0 <= target < len(prompts):
        raise ValueError(f"target: expected an index into the {len(prompts)} prompts, got {target}")
    if images.dim() != 4 or noise.shape[:2] != (images.shape[0], timesteps.shape[0]):
        raise ValueError(f"noise: expected [N={images.shape[0]}, T={timesteps.shape[0]}, ...], got {list(noise.shape)}")
    weights = {name: l.base.weight for name, l in layers.items()}
    was = {name: w.requires_grad for name, w in weights.items()}
    clf = DiffusionClassifier(backbone.unet, backbone.scheduler, temperature=temperature)
    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with torch.no_grad():
            cond = backbone.encode_prompt(prompts)
        for i in range(images.shape[0]):
            logits = clf.logits(images[i: i + 1], cond, timesteps, noise[i: i + 1])  # [1, K]
            logp = torch.log_softmax(logits.float(), dim=1)[0, target]
            grads = torch.autograd.grad(logp, list(weights.values()), allow_unused=True)
            for name, g in zip(weights, grads):
                if g is not None:
                    acc[name] += g.float() ** 2
    finally:
        for name, w in weights.items():
            w.requires_grad_(was[name])
    return {name: a / images.shape[0] for name, a in acc.items()}


class EWCMixin:
    """Online EWC with the DC Fisher: F ← γ·F + F_n after each task; penalty (λ/2)·Σ F ⊙ (ΔW_n)²."""

    def ewc_setup(self) -> None:
        self.ewc_lambda = float(self.args.ewc_lambda)
        self.ewc_gamma = float(self.args.ewc_gamma)
        if self.ewc_lambda < 0 or not 0 <= self.ewc_gamma <= 1:
            raise ValueError(f"--ewc_lambda must be >= 0 and --ewc_gamma in [0, 1], got {self.ewc_lambda}, {self.ewc_gamma}")
        self.fisher: dict[str, torch.Tensor] = {}

    def ewc_penalty(self) -> torch.Tensor:
        """(λ/2) · Σ_layers Σ F ⊙ (ΔW_n)² (zero before the first Fisher exists)."""
        if not self.fisher:
            return torch.zeros((), device=self.ctx.backbone.device)
        total = 0.0
        for name, layer in self.ctx.layers.items():
            total = total + (self.fisher[name].float() * layer.delta_weight(0) ** 2).sum()
        return 0.5 * self.ewc_lambda * total

    def task_fisher(self, n: int) -> dict[str, torch.Tensor]:
        """F_n of task n at the current (merged) model, on D_n."""
        bb, c = self.ctx.backbone, self.ctx.concepts[n]
        with torch.no_grad():
            x = bb.encode_images(c.train_images[: int(self.args.fisher_images)])
        T = int(self.args.fisher_timesteps)
        n_train = bb.scheduler.config.num_train_timesteps
        ts = torch.linspace(100, n_train - 100, T).long().to(x.device)
        g = torch.Generator().manual_seed(int(self.args.seed) * 7919 + n)
        noise = torch.randn((x.shape[0], T, *x.shape[1:]), generator=g).to(x)
        prompts = [c.prior_prompt] + [self.ctx.concepts[m].prompt for m in range(n + 1)]
        was = bb.unet.training
        bb.unet.eval()
        try:
            return dc_fisher(bb, self.ctx.layers, prompts, len(prompts) - 1, x, ts, noise,
                             float(self.args.dc_temperature))
        finally:
            bb.unet.train(was)

    def ewc_update(self, n: int) -> None:
        f_n = self.task_fisher(n)
        for name, f in f_n.items():
            prev = self.fisher.get(name)
            new = f if prev is None else self.ewc_gamma * prev.float() + f
            self.fisher[name] = new.to(torch.bfloat16)  # compact storage (module docstring)


@register
class EWCDC(DCTermsMixin, EWCMixin, Method):
    name = "ewc_dc"

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.ewc_setup()

    def dc_ce(self, batch: TaskBatch) -> torch.Tensor:
        """CE(DC logits over {c_0, sampled earlier, c_n}, c_n) on ``--dc_images`` of the batch."""
        from fastcp.dc import DiffusionClassifier

        old, new = self.dc_candidates(batch.task)
        x, ts, noise = self.dc_draw(batch.latents)
        bb = self.ctx.backbone
        clf = DiffusionClassifier(bb.unet, bb.scheduler, temperature=float(self.args.dc_temperature))
        logits = clf.logits(x, bb.encode_prompt(old + new), ts, noise)
        target = torch.full((x.shape[0],), len(old), dtype=torch.long, device=x.device)
        return F.cross_entropy(logits.float(), target)

    def loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        l_diff = self.diffusion_loss(batch)
        ce = self.dc_ce(batch) if self.args.dc_delta > 0 else torch.zeros((), device=l_diff.device)
        ewc = self.ewc_penalty()
        return {"loss": l_diff + self.args.dc_delta * ce + ewc, "diff": l_diff, "dc_ce": ce, "ewc": ewc}

    def end_task(self, n: int) -> None:
        self.release_hooks()
        for layer in self.ctx.layers.values():
            layer.merge_adapter_(0)
        self.ewc_update(n)
