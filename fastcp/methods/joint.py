"""``joint``: reference that trains one LoRA on every concept seen so far (not continual).

DESIGN.md section 6 (the upper bound of a shared adapter)::

    task n:  L = L_diff on a batch drawn uniformly over concepts 0..n (each row with its own
             prompt), one adapter (slot 0) carried across tasks, tokens of concepts 0..n trained

It reads earlier concepts' images (``sees_all_concepts``), which continual methods may not.
"""
from __future__ import annotations

import torch

from fastcp.methods.base import Method, TaskBatch, draw_rows, register, token_training


@register
class Joint(Method):
    name = "joint"
    sees_all_concepts = True

    def begin_task(self, n: int) -> list[dict]:
        self.release_hooks()
        if not token_training(self.args):  # --token_learning_rate 0: no token trained
            return [self.lora_param_group(0)]
        emb = self.ctx.backbone.text_encoder.get_input_embeddings().weight
        emb.requires_grad_(True)
        mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
        for c in self.ctx.concepts[: n + 1]:
            mask[self.ctx.backbone.concept_tokens[c.token]] = 1
        self._hooks = [emb.register_hook(lambda g: g * mask)]
        tokens = {"params": [emb], "lr": self.args.token_learning_rate, "weight_decay": 0.0}
        return [tokens, self.lora_param_group(0)]

    def sample_batch(self, n: int, images: list, batch_size: int) -> TaskBatch:
        gen = self.ctx.generator
        cids = torch.randint(0, n + 1, (batch_size,), generator=gen)
        rows, prompts = [], []
        for c in cids.tolist():
            pool = images[c]
            rows.append(draw_rows(pool, torch.randint(0, len(pool), (1,), generator=gen), gen))
            prompts.append(self.ctx.concepts[c].prompt)
        return TaskBatch(latents=torch.cat(rows), prompts=prompts, task=n, concept_ids=cids)
