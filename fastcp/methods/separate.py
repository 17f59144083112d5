"""``separate``: reference with one adapter per concept, chosen by an oracle at generation.

DESIGN.md section 6 (upper bound on retention, not a continual method in the strict sense: the
number of adapters grows with the tasks)::

    task n trains slot n only (fresh: A Kaiming-uniform, B = 0) with plain L_diff on D_n;
    concept j is generated / scored with slot j alone:  W_j = W0 + s·B_j A_j

Earlier slots are never touched again, so nothing is forgotten through the weights; what can
still move is the shared text side (each concept's own token only), which is also untouched
after its task.
"""
from __future__ import annotations

import contextlib

import torch

from fastcp.methods.base import Method, TaskBatch, register
from fastcp.nn import lora_routing


@contextlib.contextmanager
def slot_gates(layers: dict, gates: dict[str, torch.Tensor] | torch.Tensor):
    """Scale each layer's slots by fixed gates for the duration: scaling_k ← scaling_k · g_k.

    gates: one [K] tensor for every layer, or {layer name: [K]}. Unlike ``lora_routing`` this
    needs no batch size, so it applies to any call inside (sampling with classifier-free
    guidance doubles the batch; DC scoring packs many rows) — every row sees the same mix.
    """
    saved = {}
    try:
        for name, layer in layers.items():
            g = gates[name] if isinstance(gates, dict) else gates
            if g.shape != layer.scaling.shape:
                raise ValueError(f"gates: expected [{layer.num_adapters}] for {name}, got {list(g.shape)}")
            saved[name] = layer.scaling.clone()
            layer.scaling.mul_(g.to(layer.scaling))
        yield
    finally:
        for name, s in saved.items():
            layers[name].scaling.copy_(s)


@register
class Separate(Method):
    name = "separate"
    export_form = "per_concept"

    def slots_needed(self, num_concepts: int) -> int:
        return num_concepts

    def loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        ids = torch.full((batch.latents.shape[0],), batch.task, dtype=torch.long, device=batch.latents.device)
        with lora_routing(list(self.ctx.layers.values()), adapter_ids=ids):
            return {"loss": self.diffusion_loss(batch)}

    def concept_gates(self, j: int) -> torch.Tensor:
        """The oracle: slot j alone, g_j = one_hot(j) [K]."""
        k = next(iter(self.ctx.layers.values())).num_adapters
        return torch.nn.functional.one_hot(torch.tensor(j), k).float()

    def generation_routing(self, j: int):
        return slot_gates(self.ctx.layers, self.concept_gates(j))

    def adapter_slot(self, n: int) -> int:
        return n
