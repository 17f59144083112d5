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

Per step the DC term uses ``--dc_images`` images of the batch, the candidates c_0, up to
``--dc_concepts`` k earlier concepts (all while they fit, else a fresh sample of k each step; k=5
was best in the paper's ablation) and c_n, and ``--dc_train_timesteps`` random timesteps with
noise shared across concepts, all in one batched pass of the DC engine
(``fastcp.dc.DiffusionClassifier``; gradients flow to the LoRA and the concept token).

The Fisher F_n (``--fisher_estimate``):

- ``online`` (default, the paper's): accumulated *during* task n from every minibatch's DC term:
  the base weights W of the targeted layers take a gradient from the DC pass only (their
  requires_grad is on from the DC forward to the end of the step's backward), so after the
  backward W.grad = δ·∂CE_b/∂W with CE_b the minibatch's mean DC cross-entropy, i.e.
  −∂ log p(c_n | x)/∂W averaged over the minibatch's DC images (one trial per minibatch)::

      g_b = W.grad / δ   (÷ the fp16 loss scale; averaged over processes)
      F_n = (1/S) Σ_{b=1..S} g_b²          over the S optimizer steps of task n

  It costs one weight-gradient GEMM per targeted layer in the DC backward and an fp32 sum per
  targeted weight while the task trains; needs ``--dc_delta`` > 0.
- ``post_task``: after the task, with the DC engine on ≤ ``--fisher_images`` training images of
  D_n at ``--fisher_timesteps`` evenly spaced timesteps with a fixed noise per image, over every
  concept learned so far, by autograd to W with per-image gradients:
  F_n = mean_i (∂ log p(c_n | x_i)/∂W)² (``dc_fisher``; what ``dsc_ewc`` uses).

Storage: F has one entry per element of every targeted weight, kept in bfloat16 (range
of fp32, ~3 significant digits: enough for a penalty weight, half of fp32). For SD 1.5 with
LoRA on the attention projections (to_q/k/v/to_out.0 of the 16 transformer blocks) that is
93.5 M entries = 187 MB in bf16 (374 MB fp32; 11 % of the 860 M UNet parameters); with the
feed-forward linears too it is 242 M entries = 485 MB; C-LoRA-style K/V only would be 19.2 M
entries = 38 MB. The tiny model's 40 targeted layers (attention + feed-forward) hold 0.33 M
entries (0.65 MB).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fastcp.methods.base import DCDraw, Method, TaskBatch, register
from fastcp.methods.hparams import NATURAL, NONNEG, POS, POSINT, UNIT, hparam


@dataclass
class DCHyperparameters:
    """The DC term shared by ``ewc_dc`` and ``dsc``; defaults chosen on the embedded tiny sequence."""

    dc_temperature: float = hparam(0.1, POS, "DC temperature tau of softmax(-mean_t err / tau) (default 0.1: error gaps "
                                   "between concepts are ~3e-3..6e-2 on the tiny model; tau=1 gives flat scores, tau=0.01 "
                                   "saturates p(c_n|x) within tens of steps (CE ~1e-8), which also zeroes the Fisher)")
    dc_delta: float = hparam(0.001, NONNEG, "delta, weight of CE(DC logits, c_n) (default 0.001: the CE can always be "
                             "lowered by raising the other candidates' errors on D_n, which wrecks the shared weights; on "
                             "tiny, delta=0.1 raised the held-out loss after task 1 from 0.11 to 0.24 (0.66 by task 3), "
                             "delta=0.01 still forgot concept 1's fidelity fully, 0.001 kept holdout loss at naive's level)")
    dc_concepts: int = hparam(5, NATURAL, "k, earlier concepts among the DC candidates per step, besides c_0 and c_n "
                              "(default 5, the paper's best k: all earlier concepts while they fit, else a fresh "
                              "sample of k each step)")
    dc_train_timesteps: int = hparam(2, POSINT, "DC timesteps per step (default 2: a fresh draw every step averages out)")
    dc_images: int = hparam(4, POSINT, "images of the global batch that get DC terms per step (default 4 = half the "
                            "default batch: the DC pass has images x concepts x timesteps rows)")


@dataclass
class EWCHyperparameters:
    """Online EWC with the DC Fisher (``ewc_dc``, ``dsc_ewc``)."""

    ewc_lambda: float = hparam(1e4, NONNEG, "lambda of (lambda/2) sum F (dW_n)^2 (default 1e4: on tiny with tau=0.1 the "
                               "sum F (dW_n)^2 of an unregularised task is ~1e-5, so the penalty reaches L_diff's ~0.06)")
    ewc_gamma: float = hparam(1.0, UNIT, "decay gamma of F <- gamma F + F_n (default 1: every earlier concept counts "
                              "fully, the CP goal; < 1 favours recent concepts)")
    fisher_timesteps: int = hparam(4, POSINT, "timesteps (evenly spaced) per image for the Fisher (default 4)")
    fisher_images: int = hparam(8, POSINT, "training images per task for the Fisher (default 8 = all of an embedded concept)")


@dataclass
class EWCDCHyperparameters(DCHyperparameters, EWCHyperparameters):
    fisher_estimate: str = hparam("online", str, "online: F_n accumulated during task n from every minibatch's DC-term "
                                  "gradient, squared and averaged (the paper's; default); post_task: computed after the "
                                  "task on <= --fisher_images images at --fisher_timesteps fixed timesteps",
                                  choices=("online", "post_task"))


# --------------------------------------------------------------------------- shared DC helpers
class DCTermsMixin:
    """Candidate sampling, the step's DC draws and the DC CE term shared by ``ewc_dc`` and ``dsc``."""

    def dc_candidates(self, n: int) -> tuple[list[str], list[str]]:
        """(old prompts, [c_n's prompt]) for task n: c_0 = concept n's prior prompt, then up to
        k = ``dc_concepts`` earlier concepts (all of them while they fit; else k sampled)."""
        concepts = self.ctx.concepts
        k = int(self.hp.dc_concepts)
        earlier = list(range(n))
        if len(earlier) > k:
            perm = torch.randperm(len(earlier), generator=self.ctx.generator)[:k]
            earlier = sorted(earlier[i] for i in perm.tolist())
        old = [concepts[n].prior_prompt] + [concepts[m].prompt for m in earlier]
        return old, [concepts[n].prompt]

    def draw_extras(self, batch: TaskBatch) -> TaskBatch:
        """The step's DC draws for the global batch: candidates, ``dc_train_timesteps`` timesteps
        and noise [dc_images, T, ...] for its first ``dc_images`` instance rows."""
        if not self.dc_active():
            return batch
        old, new = self.dc_candidates(batch.task)
        rows = min(int(self.hp.dc_images), batch.rows - batch.prior_rows)
        T = int(self.hp.dc_train_timesteps)
        n_train = self.ctx.backbone.scheduler.config.num_train_timesteps
        gen = self.ctx.generator
        x = batch.latents
        ts = torch.randint(0, n_train, (T,), generator=gen).to(x.device)
        noise = torch.randn((rows, T, *x.shape[1:]), generator=gen).to(x)
        return replace(batch, dc=DCDraw(old, new, ts, noise))

    def dc_active(self) -> bool:
        return True

    def dc_ce(self, batch: TaskBatch) -> torch.Tensor:
        """CE(DC logits over {c_0, sampled earlier, c_n}, c_n) averaged over the global batch's DC
        images (this shard's part)."""
        from fastcp.dc import DiffusionClassifier

        rows, noise = batch.dc_rows()
        x = batch.latents[rows]
        if noise is None:  # this shard holds none of the DC images
            return torch.zeros((), device=batch.latents.device)
        bb = self.ctx.backbone
        clf = DiffusionClassifier(bb.unet, bb.scheduler, temperature=float(self.hp.dc_temperature))
        logits = clf.logits(x, bb.encode_prompt(batch.dc.old + batch.dc.new), batch.dc.timesteps, noise)
        target = torch.full((x.shape[0],), len(batch.dc.old), dtype=torch.long, device=x.device)
        return batch.share_of_mean(F.cross_entropy(logits.float(), target, reduction="sum"), batch.dc.rows)


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
        self.ewc_lambda = float(self.hp.ewc_lambda)
        self.ewc_gamma = float(self.hp.ewc_gamma)
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
            x = bb.encode_images(c.train_images[: int(self.hp.fisher_images)])
        T = int(self.hp.fisher_timesteps)
        n_train = bb.scheduler.config.num_train_timesteps
        ts = torch.linspace(100, n_train - 100, T).long().to(x.device)
        g = torch.Generator().manual_seed(int(self.args.seed) * 7919 + n)
        noise = torch.randn((x.shape[0], T, *x.shape[1:]), generator=g).to(x)
        prompts = [c.prior_prompt] + [self.ctx.concepts[m].prompt for m in range(n + 1)]
        was = bb.unet.training
        bb.unet.eval()
        try:
            return dc_fisher(bb, self.ctx.layers, prompts, len(prompts) - 1, x, ts, noise,
                             float(self.hp.dc_temperature))
        finally:
            bb.unet.train(was)

    def ewc_update(self, n: int) -> None:
        f_n = self.task_fisher(n)
        for name, f in f_n.items():
            prev = self.fisher.get(name)
            new = f if prev is None else self.ewc_gamma * prev.float() + f
            self.fisher[name] = new.to(torch.bfloat16)  # compact storage (module docstring)

    def ewc_state(self) -> dict:
        return {"fisher": dict(self.fisher)}

    def load_ewc_state(self, state: dict) -> None:
        dev = self.ctx.backbone.device
        self.fisher = {k: v.to(device=dev, dtype=torch.bfloat16) for k, v in state.get("fisher", {}).items()}


@register
class EWCDC(DCTermsMixin, EWCMixin, Method):
    name = "ewc_dc"
    export_form = "merged"
    hyperparameters = EWCDCHyperparameters

    def __init__(self, args):
        super().__init__(args)
        self.online = self.hp.fisher_estimate == "online"
        if self.online and not self.hp.dc_delta > 0:
            raise ValueError("--fisher_estimate online takes the Fisher from the DC term's gradients and needs "
                             "--dc_delta > 0; use --fisher_estimate post_task with --dc_delta 0")

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.ewc_setup()
        #: online: Σ_b g_b² per layer (fp32) and the number of steps summed, for the task in progress
        self.fisher_sum: dict[str, torch.Tensor] = {}
        self.fisher_steps = torch.zeros((), device=ctx.backbone.device)

    def dc_active(self) -> bool:
        return self.hp.dc_delta > 0

    def _base_weights_take_grad(self, on: bool) -> None:
        for layer in self.ctx.layers.values():
            layer.base.weight.requires_grad_(on)

    def loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        if self.online:  # L_diff must not reach W.grad (graph edges are fixed at forward time)
            self._base_weights_take_grad(False)
        l_diff = self.diffusion_loss(batch)
        if batch.dc is not None:
            if self.online:  # from here to the step's backward, the DC pass's gradient reaches W.grad
                self._base_weights_take_grad(True)
            ce = self.dc_ce(batch)
        else:
            ce = torch.zeros((), device=l_diff.device)
        ewc = self.ewc_penalty()
        return {"loss": l_diff + self.hp.dc_delta * ce + ewc, "diff": l_diff, "dc_ce": ce, "ewc": ewc}

    @torch.no_grad()
    def gradients_ready(self, accelerator) -> None:
        """online: after the step's backward (all micro-batches), add g_b² to the running sum,
        g_b = W.grad / (δ · loss scale), averaged over processes; a step whose g_b is not finite
        (fp16 overflow: the scaler skips it too) is left out, decided on the device (no sync)."""
        if not self.online:
            return
        scaler = getattr(accelerator, "scaler", None)
        scale = float(self.hp.dc_delta) * (float(scaler.get_scale()) if scaler is not None else 1.0)  # once a step
        grads = {}
        for name, layer in self.ctx.layers.items():
            w = layer.base.weight
            g = w.grad.float() / scale if w.grad is not None else torch.zeros_like(w, dtype=torch.float32)
            if accelerator.num_processes > 1:
                g = accelerator.reduce(g, reduction="mean")
            grads[name] = g
            w.grad = None
        self._base_weights_take_grad(False)
        finite = torch.stack([torch.isfinite(g).all() for g in grads.values()]).all().float()
        for name, g in grads.items():
            sq = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) ** 2 * finite
            prev = self.fisher_sum.get(name)
            self.fisher_sum[name] = sq if prev is None else prev + sq
        self.fisher_steps = self.fisher_steps + finite

    def task_fisher(self, n: int) -> dict[str, torch.Tensor]:
        if not self.online:
            return super().task_fisher(n)
        steps = self.fisher_steps.clamp_min(1.0)
        f_n = {name: self.fisher_sum[name] / steps if name in self.fisher_sum
               else torch.zeros_like(layer.base.weight, dtype=torch.float32)
               for name, layer in self.ctx.layers.items()}
        self.fisher_sum, self.fisher_steps = {}, torch.zeros_like(self.fisher_steps)
        return f_n

    def end_task(self, n: int) -> None:
        self.release_hooks()
        self._base_weights_take_grad(False)
        for layer in self.ctx.layers.values():
            layer.merge_adapter_(0)
        self.ewc_update(n)

    def state_dict(self) -> dict:
        state = self.ewc_state()
        if self.online:  # a checkpoint inside a task keeps what the task has summed so far
            state["fisher_sum"], state["fisher_steps"] = dict(self.fisher_sum), self.fisher_steps
        return state

    def load_state_dict(self, state: dict) -> None:
        self.load_ewc_state(state)
        if self.online:
            dev = self.ctx.backbone.device
            self.fisher_sum = {k: v.to(dev) for k, v in state.get("fisher_sum", {}).items()}
            steps = state.get("fisher_steps")
            self.fisher_steps = (steps.to(dev) if torch.is_tensor(steps) else torch.zeros((), device=dev))
