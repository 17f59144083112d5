"""``clora``: C-LoRA (Smith et al. 2023), continual self-regularised LoRA on cross-attention K/V.

DESIGN.md section 6, task n (ΔW_<n = Σ_{m<n} ΔW_m, the merged earlier deltas, per layer)::

    L = L_diff + λ · Σ_layers ‖ |ΔW_<n| ⊙ ΔW_n ‖²_F,      ΔW_n = s·B_n A_n
    after task n:  W ← W + ΔW_n,  ΔW_<n+1 = ΔW_<n + ΔW_n,  fresh LoRA

The penalty is zero where no earlier task wrote (ΔW_<n = 0) and grows with the size of what
earlier tasks wrote, so task n is pushed to use weights that earlier tasks left alone.

As in C-LoRA:

- only the cross-attention K/V adapters are trained: the to_k/to_v of every Attention module that
  attends to the text (``attn2``, and on tiny v2 also the cross-only ``attn1`` at 16×16); other
  injected layers, e.g. the tiny model's feed-forward LoRA, stay at B = 0, i.e. off;
- each concept token starts from a random embedding in every text encoder (no class-word
  initialisation, ``Backbone.add_concept_token``);
- the prompts name the token without its class word ("a photo of <v1>", ``training_concepts``),
  for training and evaluation alike; ``--clora_class_word`` keeps the sequence's prompts. The
  class word still names c_0 and the prior-preservation class images.

``--clora_targets lora`` instead trains and penalises every layer ``--lora_targets`` selects (on
tiny v1, whose cross-attention ran only at 8×8, K/V alone learned no concept: fidelity 0.03).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcp.methods.base import Method, lora_weight_decay, register
from fastcp.methods.hparams import BOOL, NONNEG, hparam
from fastcp.nn import ATTENTION_TARGETS, CROSS_KV_TARGETS
from fastcp.nn.multi_lora import matches_target


def clora_penalty(previous: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖ |ΔW_<n| ⊙ ΔW_n ‖²_F for one layer (both [out, in]; fp32 result, differentiable in delta)."""
    if previous.shape != delta.shape:
        raise ValueError(f"previous: shape {list(previous.shape)} differs from delta's {list(delta.shape)}")
    return ((previous.abs().float() * delta.float()) ** 2).sum()


@dataclass
class CLoRAHyperparameters:
    clora_lambda: float = hparam(100.0, NONNEG, "lambda of ||abs(dW_<n) * dW_n||_F^2 (default 100: on the tiny "
                                 "sequence with --clora_targets lora, 1e3 blocked every concept after the first "
                                 "(fidelity 0 on tasks 2-3, 3 seeds); 100 and 10 both learned task 2 and kept task 1 "
                                 "(seed 0); 100 regularises more)")
    clora_targets: str = hparam("cross_kv", str, "train and penalise only the cross-attention K/V adapters (default, "
                                "C-LoRA's choice) or every layer --lora_targets selects (on the tiny model, whose "
                                "cross-attention runs only at 8x8, K/V alone cannot learn a concept in a few hundred "
                                "steps)", choices=("cross_kv", "lora"))
    clora_class_word: bool = hparam(False, BOOL, "keep the class word in the prompts (\"a photo of <v1> star\"); "
                                    "default off: C-LoRA prompts the token alone (\"a photo of <v1>\")")


@register
class CLoRA(Method):
    name = "clora"
    export_form = "merged"
    hyperparameters = CLoRAHyperparameters
    lora_targets = CROSS_KV_TARGETS
    token_init = "random"  # C-LoRA: no class-word initialisation (Backbone.add_concept_token, every text encoder)

    def __init__(self, args):
        super().__init__(args)
        self.only_cross_kv = self.hp.clora_targets == "cross_kv"
        if not self.only_cross_kv:
            self.lora_targets = ATTENTION_TARGETS  # plus feed-forward under --lora_targets attn_ff

    def training_concepts(self, concepts: list) -> list:
        """C-LoRA's prompts: the token without its class word (unless ``--clora_class_word``)."""
        if self.hp.clora_class_word:
            return concepts
        from dataclasses import replace

        from fastcp.eval.prompts import prompt_without_class_word

        return [replace(c, prompt=prompt_without_class_word(c), class_word_in_prompt=False) for c in concepts]

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.lam = float(self.hp.clora_lambda)
        #: the layers C-LoRA trains and penalises (named for the default, cross-attention K/V)
        unet = ctx.backbone.unet
        self.kv_layers = ({n: l for n, l in ctx.layers.items() if matches_target(unet, n, CROSS_KV_TARGETS)}
                          if self.only_cross_kv else dict(ctx.layers))
        if not self.kv_layers:
            raise ValueError("clora: the backbone has no cross-attention to_k/to_v layers")
        self.previous = {n: torch.zeros(l.out_features, l.in_features, device=l.base.weight.device)
                         for n, l in self.kv_layers.items()}

    def state_dict(self) -> dict:
        return {"previous": dict(self.previous)}

    def load_state_dict(self, state: dict) -> None:
        for n, v in state["previous"].items():
            self.previous[n] = v.to(self.previous[n])

    def begin_task(self, n: int) -> list[dict]:
        self.release_hooks()
        params = []
        for layer in self.kv_layers.values():
            layer.lora_a.requires_grad_(True)
            layer.lora_b.requires_grad_(True)
            params += [layer.lora_a, layer.lora_b]
        return [self.token_param_group(n), {"params": params, "lr": self.args.learning_rate,
                                             "weight_decay": lora_weight_decay(self.args, 1)}]

    def penalty(self) -> torch.Tensor:
        """Σ_layers ‖ |ΔW_<n| ⊙ ΔW_n ‖²_F over the trained K/V layers."""
        return sum(clora_penalty(self.previous[n], l.delta_weight(0)) for n, l in self.kv_layers.items())

    def loss(self, batch) -> dict[str, torch.Tensor]:
        l_diff = self.diffusion_loss(batch)
        pen = self.penalty()
        return {"loss": l_diff + self.lam * pen, "diff": l_diff, "clora": pen}

    @torch.no_grad()
    def end_task(self, n: int) -> None:
        self.release_hooks()
        for name, layer in self.kv_layers.items():
            self.previous[name] += layer.delta_weight(0)
            layer.merge_adapter_(0)
