"""``ortho``: merge after every task, with task n's A initialised orthogonal to earlier A's.

Two variants (``--ortho_variant``), measured side by side in ``benchmarks/results/cp_methods.md``.

``paper`` (default): the released code of Deja et al. 2024 (GitHub luk-st/continual-lora,
``lora/train_dreambooth_lora_sdxl.py``, ``ortho_init``), which keeps *summed* factors::

    state after task n:  A_cum = Σ_{m≤n} A_m  [r, in],   B_cum = Σ_{m≤n} B_m  [out, r]
    model:               W = W0 + s·B_cum A_cum            (so cross terms B_m A_k, m ≠ k, are in it)
    task n+1:            A[:, j] = the last right singular vector of the 1×r matrix A_cum[:, j]ᵀ
                         (a unit vector of R^r orthogonal to column j of A_cum, for every input j);
                         B = 0
    merge after task n+1:  W += s·[(B_cum + B_{n+1})(A_cum + A_{n+1}) − B_cum A_cum]

``exact``: fastcp's own form, exact merges and orthogonal row spaces
(DESIGN.md section 6)::

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

How they differ: ``exact`` merges Σ_n s B_n A_n and makes A_{n+1}'s rows orthogonal to the rows
of every earlier A (a subspace of the input space); ``paper`` rotates each input column inside
the r-dimensional rank space, orthogonal to the summed earlier column, and its merge adds the
cross terms s(B_cum A_{n+1} + B_{n+1} A_cum), which change what earlier tasks wrote. Task 1 starts
from fastcp's Kaiming-uniform A in both (the released code draws peft's Gaussian init).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fastcp import ops
from fastcp.methods.base import register
from fastcp.methods.hparams import hparam
from fastcp.methods.merge import Merge


def column_rotation_init(a_cum: torch.Tensor) -> torch.Tensor:
    """The released code's new A [r, in] from the summed earlier A's ``a_cum`` [r, in] (fp32):
    column j is ``vh[-1]`` of the SVD of the 1×r matrix a_cum[:, j]ᵀ, a unit vector orthogonal to
    a_cum[:, j] (for r ≥ 2; any unit vector when that column is zero). Batched over the columns."""
    if a_cum.dim() != 2 or a_cum.shape[0] < 2:
        raise ValueError(f"a_cum: expected [r >= 2, in], got {list(a_cum.shape)}")
    _, _, vh = torch.linalg.svd(a_cum.float().T.unsqueeze(1))  # [in, 1, r] -> vh [in, r, r]
    return vh[:, -1, :].T.contiguous()


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


@dataclass
class OrthoHyperparameters:
    ortho_variant: str = hparam("paper", str, "paper: the released code's column-wise rotation in rank space and "
                                "summed-factor merge W0 + s(sum B)(sum A), cross terms included (default); exact: "
                                "rows of A orthogonal to every earlier A's row space, exact merge W0 + sum s B_n A_n",
                                choices=("paper", "exact"))


@register
class Ortho(Merge):
    name = "ortho"
    hyperparameters = OrthoHyperparameters

    def __init__(self, args):
        super().__init__(args)
        self.paper = self.hp.ortho_variant == "paper"
        if self.paper:  # W − W0 = s·B_cum A_cum: the method's own factors, not the per-task files
            self.export_form = "terms"

    def setup(self, ctx) -> None:
        super().setup(ctx)
        # exact: earlier tasks' A rows per layer, fp32 [n·r, in] (r·in per task).
        self.previous_a: dict[str, torch.Tensor] = {}
        # paper: the summed factors per layer, fp32 ([r, in], [out, r]).
        self.a_cum: dict[str, torch.Tensor] = {}
        self.b_cum: dict[str, torch.Tensor] = {}

    def begin_task(self, n: int) -> list[dict]:
        if n > 0:
            self._rotate() if self.paper else self._orthogonalise()
        return super().begin_task(n)

    @torch.no_grad()
    def _rotate(self) -> None:
        for name, layer in self.ctx.layers.items():
            r = int(layer.ranks[0])
            layer.lora_a[0, :r] = column_rotation_init(self.a_cum[name]).to(layer.lora_a.dtype)

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
        if self.paper:
            return self._merge_summed_factors()
        with torch.no_grad():
            for name, layer in self.ctx.layers.items():
                a = layer.lora_a[0, : int(layer.ranks[0])].detach().float().clone()
                prev = self.previous_a.get(name)
                self.previous_a[name] = a if prev is None else torch.cat([prev, a])
        super().end_task(n)

    @torch.no_grad()
    def _merge_summed_factors(self) -> None:
        """W += s·[(B_cum + B_n)(A_cum + A_n) − B_cum A_cum] = s·[B_n A_n + B_cum A_n + B_n A_cum]
        (one fp32 product of the stacked factors), then A_cum += A_n, B_cum += B_n; fresh slot."""
        self.release_hooks()
        for name, layer in self.ctx.layers.items():
            r = int(layer.ranks[0])
            a_n, b_n = layer.lora_a[0, :r].float(), layer.lora_b[0, :, :r].float()
            a_cum, b_cum = self.a_cum.get(name), self.b_cum.get(name)
            if a_cum is None:
                a_st, b_st = a_n, b_n
                self.a_cum[name], self.b_cum[name] = a_n.clone(), b_n.clone()
            else:
                a_st, b_st = torch.cat([a_n, a_n, a_cum]), torch.cat([b_n, b_cum, b_n], dim=1)
                self.a_cum[name], self.b_cum[name] = a_cum + a_n, b_cum + b_n
            ops.merge_lora_(layer.base.weight, a_st, b_st, float(layer.scaling[0]))
            layer.reset_adapter(0, rank=r, alpha=float(layer.scaling[0] * r))

    def lora_terms(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """paper: W − W0 = s·B_cum A_cum per layer (one rank-r term)."""
        return {name: [(self.a_cum[name], self.b_cum[name], float(layer.scaling[0]))]
                for name, layer in self.ctx.layers.items()}

    def state_dict(self) -> dict:
        if self.paper:
            return {"a_cum": dict(self.a_cum), "b_cum": dict(self.b_cum)}
        return {"previous_a": dict(self.previous_a)}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.backbone.device
        if self.paper:
            self.a_cum = {n: v.to(dev) for n, v in state.get("a_cum", {}).items()}
            self.b_cum = {n: v.to(dev) for n, v in state.get("b_cum", {}).items()}
        else:
            self.previous_a = {n: v.to(dev) for n, v in state["previous_a"].items()}
