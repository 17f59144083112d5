"""``ortho``: merge after every task, with task n's A initialised orthogonal to all earlier A's.

DESIGN.md section 6 (Deja et al. 2024, "merging orthogonally initialised adapters")::

    after task n:  W ← W + s·B_n A_n   (fp32), store A_n
    task n+1:      A ~ Kaiming-uniform [r, in];  Q = orthonormal basis of the row space of
                   [A_1; …; A_n] ([n·r, in], per layer);  A_{n+1} = c · (A − A Q Qᵀ),
                   c = ‖A‖_F / ‖A − A Q Qᵀ‖_F (the usual init scale);  B_{n+1} = 0

Because B starts at zero the first step is plain merge; the orthogonal A makes the new delta
B A act (at initialisation, and as long as A stays near it) on input directions that earlier
deltas did not read, so it interferes less with them.

When the earlier rows already span the whole input space (n·r ≥ in) there is no orthogonal
complement left: the layer keeps the plain random A and a warning says so (the tiny model's
64-wide layers at rank 8 fit 8 tasks).
"""
from __future__ import annotations

import warnings

import torch

from fastcp.methods.base import register
from fastcp.methods.merge import Merge


def orthogonal_init(a: torch.Tensor, previous: torch.Tensor | None, tol: float = 1e-6) -> torch.Tensor:
    """Project the rows of ``a`` [r, in] onto the orthogonal complement of the row space of
    ``previous`` [m, in] (or return ``a`` when ``previous`` is None/empty), rescaled to ‖a‖_F.

    Returns a new tensor [r, in] (fp32). Raises ValueError on mismatched shapes. If the
    complement is empty the projection is zero and ``a`` is returned unchanged.
    """
    if a.dim() != 2:
        raise ValueError(f"a: expected [r, in], got {list(a.shape)}")
    a = a.float()
    if previous is None or previous.numel() == 0:
        return a.clone()
    if previous.dim() != 2 or previous.shape[1] != a.shape[1]:
        raise ValueError(f"previous: expected [m, in={a.shape[1]}], got {list(previous.shape)}")
    # Orthonormal basis of the row space: right singular vectors with non-negligible singular values.
    _, s, vh = torch.linalg.svd(previous.float(), full_matrices=False)
    q = vh[s > tol * s.max().clamp_min(1e-30)]  # [rank, in]
    proj = a - (a @ q.T) @ q
    norm = proj.norm()
    if norm <= tol * a.norm():
        return a.clone()
    return proj * (a.norm() / norm)


@register
class Ortho(Merge):
    name = "ortho"

    def setup(self, ctx) -> None:
        super().setup(ctx)
        # Earlier tasks' A rows per layer, fp32 [n·r, in]: the only extra state (r·in per task).
        self.previous_a: dict[str, torch.Tensor] = {}

    def begin_task(self, n: int) -> list[dict]:
        if n > 0:
            self._orthogonalise()
        return super().begin_task(n)

    @torch.no_grad()
    def _orthogonalise(self) -> None:
        full = []
        for name, layer in self.ctx.layers.items():
            prev = self.previous_a.get(name)
            r = int(layer.ranks[0])
            if prev is not None and prev.shape[0] >= layer.in_features and torch.linalg.matrix_rank(prev) >= layer.in_features:
                full.append(name)
            new = orthogonal_init(layer.lora_a[0, :r], prev)
            layer.lora_a[0, :r] = new.to(layer.lora_a.dtype)
        if full:
            warnings.warn(f"ortho: earlier adapters span the whole input of {len(full)} layer(s) (e.g. {full[0]}); "
                          "their new A is not orthogonal", stacklevel=2)

    def end_task(self, n: int) -> None:
        with torch.no_grad():
            for name, layer in self.ctx.layers.items():
                a = layer.lora_a[0, : int(layer.ranks[0])].detach().float().clone()
                prev = self.previous_a.get(name)
                self.previous_a[name] = a if prev is None else torch.cat([prev, a])
        super().end_task(n)

    def state_dict(self) -> dict:
        return {"previous_a": dict(self.previous_a)}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.backbone.device
        self.previous_a = {n: v.to(dev) for n, v in state["previous_a"].items()}
