"""The interface every continual-personalization method implements (DESIGN.md section 6).

The training loop (``fastcp.continual``) owns data, optimisation, evaluation and files; a method
owns only what differs between methods:

- ``training_concepts(concepts)``: once, first: the concepts as the method prompts them (C-LoRA
  drops the class word);
- ``setup(ctx)``: once, after LoRA injection (``ctx.layers``) and token creation;
- ``begin_task(n)``: returns the parameter groups to optimise for task n (None entries are skipped:
  ``token_param_group`` under ``--token_learning_rate 0``);
- ``loss(batch)``: a dict of named loss terms, ``"loss"`` being the total to minimise;
- ``gradients_ready(accelerator)``: once per optimizer step, after its backward (gradient statistics);
- ``end_task(n)``: merge / store / compute importance after task n;
- ``generation_routing(j)``: a context manager that sets the adapters up to generate or score
  concept j (a no-op for methods that keep one merged model);
- ``adapter_slot(n)``: which slot holds task n's adapter at the end of task n (what is saved);
- ``draw_step``/``draw_extras``: every random draw of a training step, made once for the global
  batch before it is split over processes (so N processes train like one with the N-times batch);
- ``state_dict``/``load_state_dict``: the method's own state for checkpoints (tensors + JSON values);
- ``hyperparameters``: a dataclass of the method's flags, beside its code (``fastcp.methods.hparams``).

Loss terms that average over rows return this shard's part of the global mean
(``TaskBatch.share_of_mean``); terms that do not depend on the batch (penalties) are computed whole.

Notation: W0 frozen base weights of the targeted layers; ΔW_n = s·B_n A_n task n's LoRA delta;
L_diff = ||target − ε_θ(x_t, t, p_n)||² with target = ε (or v for v-prediction schedulers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from fastcp.methods.hparams import NoHyperparameters, from_args
from fastcp.models.noise import min_snr_weights, noisy_input_and_target
from fastcp.nn import ATTENTION_TARGETS, MultiLoRALinear


@dataclass
class DCDraw:
    """One step's diffusion-classifier draws, made once for the global batch (``ewc_dc``, ``dsc``):
    the candidate prompts (``old`` = c_0 and sampled earlier concepts, ``new`` = [c_n]), timesteps
    [T] shared by every image, and noise [rows, T, C, h, w] for the first ``rows`` rows of the
    global batch (the images that get DC terms)."""

    old: list[str]
    new: list[str]
    timesteps: torch.Tensor
    noise: torch.Tensor

    @property
    def rows(self) -> int:
        return self.noise.shape[0]


@dataclass
class TaskBatch:
    """One training batch of task n: latents [B, C, h, w], prompts (len B), task index n,
    ``concept_ids`` [B] (which concept each row shows; all n for continual methods), and every
    random draw of the step (``Method.draw``): L_diff's noise [B, C, h, w] and timesteps [B],
    ``prior`` [B] bool (prior-preservation class rows), ``dc`` (the DC draws).

    A batch is first drawn whole (the *global* batch of all processes and accumulation steps) and
    then ``shard``-ed; ``row_offset``/``global_rows``/``shards`` say which part this is, and
    ``share_of_mean`` turns a sum over this shard's rows into its part of the global mean.
    """

    latents: torch.Tensor
    prompts: list[str]
    task: int
    concept_ids: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    prior: torch.Tensor | None = None
    prior_rows: int = 0
    dc: DCDraw | None = None
    row_offset: int = 0
    global_rows: int | None = None
    shards: int = 1

    def __post_init__(self):
        if self.global_rows is None:
            self.global_rows = len(self.prompts)

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def shard(self, index: int, count: int) -> "TaskBatch":
        """The ``index``-th of ``count`` equal contiguous slices (a process's or micro-batch's rows)."""
        if count == 1:
            return self
        if self.rows % count:
            raise ValueError(f"the global batch of {self.rows} rows does not split evenly over {count} "
                             "processes x gradient-accumulation steps; change --train_batch_size")
        b = self.rows // count
        rows = slice(index * b, (index + 1) * b)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(self, latents=self.latents[rows], prompts=self.prompts[rows], concept_ids=pick(self.concept_ids),
                       noise=pick(self.noise), timesteps=pick(self.timesteps), prior=pick(self.prior),
                       row_offset=index * b, global_rows=self.rows, shards=count)

    def share_of_mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """This shard's part of a mean over ``count`` rows of the global batch, ``total`` being the
        sum over this shard's rows: total · shards / count. Averaging it over the shards (DDP's
        gradient mean, accelerate's accumulation) gives the global mean; one shard gives the mean."""
        return total / (count / self.shards)

    def dc_rows(self) -> tuple[slice, torch.Tensor | None]:
        """(this shard's rows that get DC terms, their DC noise [n, T, ...]); the DC rows are the
        first ``dc.rows`` rows of the global batch."""
        n = max(0, min(self.dc.rows - self.row_offset, self.rows))
        return slice(0, n), (self.dc.noise[self.row_offset: self.row_offset + n] if n else None)


@dataclass
class Context:
    """What a method may use: the backbone, its LoRA layers, the concepts, the run's arguments."""

    backbone: Any
    layers: dict[str, MultiLoRALinear]
    concepts: list
    args: Any
    generator: torch.Generator
    extra: dict = field(default_factory=dict)


class Method:
    """Base class; see the module docstring for the hooks."""

    name = "base"
    #: the method's hyperparameters (a dataclass of ``hparam`` fields, beside the method's code)
    hyperparameters: type = NoHyperparameters
    #: adapter slots each MultiLoRALinear needs
    num_slots = 1
    #: True only for references that may use earlier concepts' data (joint); continual methods never do
    sees_all_concepts = False
    #: which linears get LoRA (qualified-name suffixes)
    lora_targets: tuple[str, ...] = ATTENTION_TARGETS
    #: how a concept token starts under ``--token_init auto``: its class word's embedding, or random
    token_init = "class"
    #: what the personalized model is after a task, for ``RUN/model/`` (``fastcp.models.export``):
    #: ``"carried"``: W0 + s·B A of the live slot 0 (one LoRA carried across tasks; naive, joint);
    #: ``"merged"``: W0 + Σ_n s_n B_n A_n, each task's slot folded into the base weight at its end
    #: (merge, ortho, clora, ewc_dc, dsc), the factors read from the per-task adapter files;
    #: ``"dense"``: W0 + ``dense_delta()`` (magmax: elementwise, not low rank);
    #: ``"terms"``: W0 + Σ scale·B A over ``lora_terms()`` (the method keeps the factors itself:
    #: ``ortho --ortho_variant paper``'s summed factors);
    #: ``"per_concept"``: concept j's model is W0 + Σ_k g_j[k]·s_k B_k A_k with g_j = ``concept_gates(j)``
    #: (separate, fl2t): one adapter per concept
    export_form = "carried"

    def __init__(self, args):
        self.args = args
        self.hp = from_args(self.hyperparameters, args)
        self.ctx: Context | None = None

    def slots_needed(self, num_concepts: int) -> int:
        """Adapter slots to inject for a sequence of ``num_concepts`` (one per concept for
        ``separate``/``fl2t``); called before ``setup``."""
        return self.num_slots

    # ----------------------------------------------------------------- hooks
    def setup(self, ctx: Context) -> None:
        self.ctx = ctx

    def begin_task(self, n: int) -> list[dict]:
        """Default: train task n's token and the LoRA slot ``adapter_slot(n)``."""
        self.release_hooks()
        return [self.token_param_group(n), self.lora_param_group(self.adapter_slot(n))]

    def loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        return {"loss": self.diffusion_loss(batch)}

    def training_concepts(self, concepts: list) -> list:
        """The concepts as this method trains and prompts them; called once, before the run's
        fingerprint (so a resumed or extended run rewrites them alike). Default: unchanged."""
        return concepts

    def gradients_ready(self, accelerator) -> None:
        """Called once per optimizer step, after the backward of its last micro-batch and before
        clipping and the update (``ewc_dc``'s online Fisher reads the step's gradients here)."""

    def end_task(self, n: int) -> None:
        pass

    # ----------------------------------------------------------------- the step's random draws
    # Every random draw of a training step is made here, once, for the global batch, from the
    # run's generator (``ctx.generator``), before the batch is split over processes and
    # accumulation steps: sample_batch (which images) -> prior rows -> L_diff noise and
    # timesteps -> draw_extras (the method's own, e.g. DC candidates, timesteps and noise).
    def draw_step(self, n: int, images: list, batch_size: int, class_images: list | None = None) -> TaskBatch:
        """The whole global batch of a step of task n, every draw made. ``images[k]``: concept
        k's ``TrainImages`` (or latents [N, C, h, w]) for every k the method may see;
        ``class_images[k]``: concept k's prior-preservation class images, or None."""
        batch = self.sample_batch(n, images, batch_size)
        if class_images is not None:
            batch = self.add_prior_rows(batch, class_images)
        return self.draw(batch)

    def sample_batch(self, n: int, images: list, batch_size: int) -> TaskBatch:
        """Task n's training rows. ``images[k]`` are concept k's training images for every
        k <= n the method may see (the loop passes only task n's unless ``sees_all_concepts``)."""
        pool = images[n]
        idx = torch.randint(0, len(pool), (batch_size,), generator=self.ctx.generator)
        return TaskBatch(latents=draw_rows(pool, idx, self.ctx.generator),
                         prompts=[self.ctx.concepts[n].prompt] * batch_size, task=n)

    def add_prior_rows(self, batch: TaskBatch, class_images: list) -> TaskBatch:
        """DreamBooth prior preservation: one class-image row per instance row (same concept),
        appended after the instance rows, with the concept's class prompt."""
        gen = self.ctx.generator
        cids = batch.concept_ids.tolist() if batch.concept_ids is not None else [batch.task] * batch.rows
        rows, prompts = [], []
        for k in cids:
            pool = class_images[k]
            idx = torch.randint(0, len(pool), (1,), generator=gen)
            rows.append(draw_rows(pool, idx, gen))
            prompts.append(self.ctx.concepts[k].class_prompt)
        dev = batch.latents.device
        concept_ids = None if batch.concept_ids is None else torch.cat([batch.concept_ids, batch.concept_ids])
        prior = torch.cat([torch.zeros(batch.rows, dtype=torch.bool), torch.ones(batch.rows, dtype=torch.bool)]).to(dev)
        return replace(batch, latents=torch.cat([batch.latents, torch.cat(rows).to(batch.latents)]),
                       prompts=batch.prompts + prompts, concept_ids=concept_ids, prior=prior, prior_rows=batch.rows,
                       global_rows=2 * batch.rows)

    def draw(self, batch: TaskBatch) -> TaskBatch:
        """Fill what ``batch`` lacks: L_diff's noise [B, C, h, w] (plus ``--noise_offset`` · n,
        n [B, C, 1, 1]) and timesteps [B], then the method's own draws (``draw_extras``)."""
        gen = self.ctx.generator
        if batch.noise is None:
            x = batch.latents
            noise = torch.randn(x.shape, generator=gen).to(x)
            t = torch.randint(0, self.ctx.backbone.scheduler.config.num_train_timesteps, (x.shape[0],), generator=gen)
            offset = float(getattr(self.args, "noise_offset", 0.0) or 0.0)
            if offset:  # diffusers' noise offset: a per-channel constant shift (darker/brighter images)
                noise = noise + offset * torch.randn((x.shape[0], x.shape[1], 1, 1), generator=gen).to(x)
            batch = replace(batch, noise=noise, timesteps=t.to(x.device))
        return self.draw_extras(batch)

    def draw_extras(self, batch: TaskBatch) -> TaskBatch:
        """The method's own per-step draws (none by default)."""
        return batch

    def generation_routing(self, j: int):
        return contextlib.nullcontext()

    def adapter_slot(self, n: int) -> int:
        return 0

    def extension_problem(self) -> str | None:
        """Why a finished run of this method cannot take more concepts (``--extend_run``), or None."""
        return None

    # ----------------------------------------------------------------- export (``export_form``)
    def dense_delta(self) -> dict[str, torch.Tensor]:
        """``"dense"`` methods: {layer name: W − W0 [out, in]} after the last finished task."""
        raise NotImplementedError(f"{self.name}: export_form is {self.export_form!r}, not 'dense'")

    def lora_terms(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """``"terms"`` methods: {layer name: [(A [r, in], B [out, r], scale)]} with W − W0 = Σ scale·B A
        after the last finished task."""
        raise NotImplementedError(f"{self.name}: export_form is {self.export_form!r}, not 'terms'")

    def concept_gates(self, j: int) -> dict[str, torch.Tensor] | torch.Tensor:
        """``"per_concept"`` methods: the slot gates g_j [K] of concept j after the last finished
        task (one tensor for every layer, or {layer name: [K]}); generation of concept j scales
        slot k by g_j[k] (``generation_routing``)."""
        raise NotImplementedError(f"{self.name}: export_form is {self.export_form!r}, not 'per_concept'")

    def state_dict(self) -> dict:
        """Method state beyond the LoRA layers and tokens (e.g. importance weights), for checkpoints:
        a nested dict of tensors and JSON values (saved as safetensors + JSON, never pickled)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules beyond the UNet and text encoders whose parameters the method trains (fl2t's
        set module): they join the model that DDP wraps."""
        return {}

    # ----------------------------------------------------------------- helpers shared by methods
    def slot_params(self, k: int) -> list[torch.nn.Parameter]:
        """Slot k's LoRA matrices are views of the per-layer [K, ...] parameters, so a method that
        trains only slot k optimises the whole tensors but masks the other slots' gradients."""
        params = []
        for layer in self.ctx.layers.values():
            params += [layer.lora_a, layer.lora_b]
        return params

    def token_param_group(self, n: int) -> dict | None:
        """Task n's concept-token embedding row in every text encoder (the rest of each table gets
        zero gradient, and the group has no weight decay, so Adam leaves it untouched).
        None under ``--token_learning_rate 0``: no token is trained (the token keeps its initial
        embedding, as in the low-rank CP paper), and the text encoders take no backward."""
        self._hooks = getattr(self, "_hooks", [])
        if not token_training(self.args):
            return None
        bb = self.ctx.backbone
        token = self.ctx.concepts[n].token
        tables = []
        for (_, encoder), token_id in zip(bb.text_pairs(), bb.concept_token_ids(token)):
            emb = encoder.get_input_embeddings().weight
            emb.requires_grad_(True)
            mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
            mask[token_id] = 1
            self._hooks.append(emb.register_hook(lambda g, m=mask: g * m))
            tables.append(emb)
        return {"params": tables, "lr": self.args.token_learning_rate, "weight_decay": 0.0}

    def lora_param_group(self, slot: int) -> dict:
        """All LoRA tensors with a gradient mask that keeps only slot ``slot`` trainable."""
        params = self.slot_params(slot)
        num = next(iter(self.ctx.layers.values())).num_adapters
        for p in params:  # before the hooks: a tensor that needs no grad takes none
            p.requires_grad_(True)
        if num > 1:
            for p in params:
                mask = torch.zeros(num, *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
                mask[slot] = 1
                self._hooks.append(p.register_hook(lambda g, m=mask: g * m))
        return {"params": params, "lr": self.args.learning_rate, "weight_decay": lora_weight_decay(self.args, num)}

    def release_hooks(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []

    def diffusion_loss(self, batch: TaskBatch) -> torch.Tensor:
        """L_diff = mean over the global batch of ||target − ε_θ(x_t, t, p)||² (this shard's part)."""
        bb = self.ctx.backbone
        x_t, target = noisy_input_and_target(bb.scheduler, batch.latents, batch.noise, batch.timesteps,
                                             bb.prediction_type)
        cond = bb.encode_prompt(batch.prompts)
        pred = bb.unet(x_t, batch.timesteps, **cond.unet_kwargs()).sample
        return self.diffusion_loss_of(pred, target, batch)

    def diffusion_loss_of(self, pred: torch.Tensor, target: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """L_diff from predictions: per-row mean squared error, optionally weighted by min-SNR-γ
        (``--snr_gamma``), over instance rows, plus ``--prior_loss_weight`` × the same over
        prior-preservation rows (DreamBooth); each a mean over the global batch's rows."""
        gamma = getattr(self.args, "snr_gamma", None)
        if batch.prior is None and not gamma:  # the plain case: one fused reduction
            return batch.share_of_mean(F.mse_loss(pred.float(), target.float(), reduction="sum") / pred[0].numel(),
                                       batch.global_rows)
        err = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)  # [b]
        if gamma:
            bb = self.ctx.backbone
            err = err * min_snr_weights(bb.scheduler, batch.timesteps, gamma, bb.prediction_type)
        if batch.prior is None:
            return batch.share_of_mean(err.sum(), batch.global_rows)
        prior = batch.prior.to(err.dtype)
        instance = batch.share_of_mean((err * (1 - prior)).sum(), batch.global_rows - batch.prior_rows)
        return instance + float(self.args.prior_loss_weight) * batch.share_of_mean((err * prior).sum(), batch.prior_rows)


def token_training(args) -> bool:
    """Whether concept tokens are trained (``--token_learning_rate`` > 0)."""
    return float(getattr(args, "token_learning_rate", 0.0) or 0.0) > 0


def draw_rows(pool, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rows ``idx`` of a concept's images: ``TrainImages.draw`` (augmentations drawn from
    ``generator``) or plain indexing of a latents tensor."""
    if isinstance(pool, torch.Tensor):
        return pool[idx.to(pool.device)]
    return pool.draw(idx, generator)


def lora_weight_decay(args, num_slots: int) -> float:
    """AdamW's decoupled weight decay of the LoRA group (``--adam_weight_decay``). It shrinks every
    element of a tensor, gradient or not, so with several adapter slots in one tensor it would
    also decay the frozen slots of earlier concepts: refused there."""
    wd = float(getattr(args, "adam_weight_decay", 0.0) or 0.0)
    if wd and num_slots > 1:
        raise ValueError(f"--adam_weight_decay {wd}: this method keeps {num_slots} adapter slots in one tensor, and "
                         "weight decay would shrink the frozen ones too; use 0")
    return wd


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
