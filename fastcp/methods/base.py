"""The interface every continual-personalization method implements (DESIGN.md section 6).

The training loop (``fastcp.continual``) owns data, optimisation, evaluation and files; a method
owns only what differs between methods:

- ``setup(ctx)``: once, after LoRA injection (``ctx.layers``) and token creation;
- ``begin_task(n)``: returns the parameter groups to optimise for task n;
- ``loss(batch)``: a dict of named loss terms, ``"loss"`` being the total to minimise;
- ``end_task(n)``: merge / store / compute importance after task n;
- ``generation_routing(j)``: a context manager that sets the adapters up to generate or score
  concept j (a no-op for methods that keep one merged model);
- ``adapter_slot(n)``: which slot holds task n's adapter at the end of task n (what is saved).

Notation: W0 frozen base weights of the targeted layers; ΔW_n = s·B_n A_n task n's LoRA delta;
L_diff = ||target − ε_θ(x_t, t, p_n)||² with target = ε (or v for v-prediction schedulers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fastcp.nn import ATTENTION_TARGETS, MultiLoRALinear


@dataclass
class TaskBatch:
    """One training batch of task n: latents [B, C, h, w], prompts (len B), task index n, and
    ``concept_ids`` [B] (which concept each row shows; all n for continual methods)."""

    latents: torch.Tensor
    prompts: list[str]
    task: int
    concept_ids: torch.Tensor | None = None
    #: L_diff's noise [B, C, h, w] and timesteps [B], drawn by the loop for the whole global batch
    #: (so that processes and gradient-accumulation micro-batches see exactly the rows one big
    #: batch would); None = ``noisy_inputs`` draws them itself
    noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None

    def with_noise(self, scheduler, generator: torch.Generator) -> "TaskBatch":
        """This batch with its L_diff noise and timesteps drawn from ``generator``."""
        noise = torch.randn(self.latents.shape, generator=generator).to(self.latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (self.latents.shape[0],), generator=generator)
        return TaskBatch(self.latents, self.prompts, self.task, self.concept_ids, noise, t.to(self.latents.device))

    def shard(self, index: int, count: int) -> "TaskBatch":
        """The ``index``-th of ``count`` equal contiguous slices (a process's or micro-batch's rows)."""
        if count == 1:
            return self
        b = len(self.prompts) // count
        rows = slice(index * b, (index + 1) * b)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TaskBatch(self.latents[rows], self.prompts[rows], self.task, pick(self.concept_ids), pick(self.noise),
                         pick(self.timesteps))


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
    #: adapter slots each MultiLoRALinear needs
    num_slots = 1
    #: True only for references that may use earlier concepts' data (joint); continual methods never do
    sees_all_concepts = False
    #: which linears get LoRA (qualified-name suffixes)
    lora_targets: tuple[str, ...] = ATTENTION_TARGETS

    def __init__(self, args):
        self.args = args
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

    def end_task(self, n: int) -> None:
        pass

    def sample_batch(self, n: int, latents: list[torch.Tensor], batch_size: int) -> TaskBatch:
        """Task n's training batch. ``latents[k]`` are concept k's encoded training images for every
        k <= n the method may see (the loop passes only task n's unless ``sees_all_concepts``)."""
        pool = latents[n]
        idx = torch.randint(0, pool.shape[0], (batch_size,), generator=self.ctx.generator)
        return TaskBatch(latents=pool[idx], prompts=[self.ctx.concepts[n].prompt] * batch_size, task=n)

    def generation_routing(self, j: int):
        return contextlib.nullcontext()

    def adapter_slot(self, n: int) -> int:
        return 0

    def state_dict(self) -> dict:
        """Method state beyond the LoRA layers and tokens (e.g. importance weights), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ----------------------------------------------------------------- helpers shared by methods
    def slot_params(self, k: int) -> list[torch.nn.Parameter]:
        """Slot k's LoRA matrices are views of the per-layer [K, ...] parameters, so a method that
        trains only slot k optimises the whole tensors but masks the other slots' gradients."""
        params = []
        for layer in self.ctx.layers.values():
            params += [layer.lora_a, layer.lora_b]
        return params

    def token_param_group(self, n: int) -> dict:
        """Task n's concept-token embedding row in every text encoder (the rest of each table gets
        zero gradient, so Adam without weight decay leaves it untouched)."""
        bb = self.ctx.backbone
        token = self.ctx.concepts[n].token
        tables = []
        self._hooks = []
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
        return {"params": params, "lr": self.args.learning_rate, "weight_decay": 0.0}

    def release_hooks(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []

    def noisy_inputs(self, latents: torch.Tensor, batch: TaskBatch | None = None):
        """(x_t, t, target) for L_diff: the batch's own noise and timesteps if the loop drew them,
        else fresh ones from the run's generator."""
        sched = self.ctx.backbone.scheduler
        if batch is not None and batch.noise is not None:
            noise, t = batch.noise, batch.timesteps
        else:
            gen = self.ctx.generator
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
        x_t = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t) if self.ctx.backbone.prediction_type == "v_prediction" else noise
        return x_t, t, target

    def diffusion_loss(self, batch: TaskBatch) -> torch.Tensor:
        """L_diff = mean ||target − ε_θ(x_t, t, p_n)||²."""
        bb = self.ctx.backbone
        x_t, t, target = self.noisy_inputs(batch.latents, batch)
        cond = bb.encode_prompt(batch.prompts)
        pred = bb.unet(x_t, t, **cond.unet_kwargs()).sample
        return F.mse_loss(pred.float(), target.float())


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
