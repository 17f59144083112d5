"""``fl2t``: Forget Less by Learning Together — concurrent, order-agnostic concept learning.

DESIGN.md section 6. One LoRA slot per concept (slot k = concept k), learnable proxies P_k
(initialised from concept k's token embedding), and a set-invariant module: a transformer
encoder **without positional encoding** over the proxies of the concepts learned so far::

    H = Enc( {P_1 W_p, …, P_K W_p} )                      [K, d]   (permutation-equivariant)
    e_b = text-encoder hidden state at prompt b's concept token   [D]
    s[b, k] = ⟨e_b W_q, H_k⟩ / √d                          proxy score
    g_l[b, k] = σ(a_l · s[b, k] + c_l)                      gate of adapter k in targeted layer l
    coef_l[b, k] = 1 if k = id_b else g_l[b, k]             (id_b = the concept of prompt b)
    y_l = x W_lᵀ + Σ_k coef_l[b, k] · s_k (x A_kᵀ) B_kᵀ      (the fused op's per-sample ``coef``)

    L = L_diff (all concepts of the set in one batch, rows routed to their own slot)
        + w_nce · InfoNCE,   InfoNCE = CE( s[b, ·] / τ_c , id_b )   over the proxies seen so far
        + w_keep · mean_{l, j < set start, k} ( coef_l[j, k] − coef_l^start[j, k] )²

The prompt's own adapter is always on: id_b is read from the prompt's tokens (the concept token it
contains; none: no own adapter), never from the row's label, so this is no oracle; the proxies
decide how much every other concept's adapter helps this prompt, per layer (inter-concept
guidance). Generation of concept j uses the same coef_l[j, ·], fixed over the batch.

The last term (routing keep, ``--fl2t_keep_weight``) is fastcp's addition for the incremental
case, not in the paper (which learns its concepts as one set): the set module is shared, so
fitting a new set would otherwise re-route the prompts of earlier sets (switching the new adapters into them, or raising every c_l). It holds earlier
concepts' coef at their values when the set started (new slots at 0); it needs only their prompts,
no images. With one set (``--fl2t_set_size 0``) it is absent.

Concepts arrive in sets of ``--fl2t_set_size`` consecutive tasks (default 2). Within a set the
concepts are learned concurrently: at each task of the set, the set's slots, proxies, tokens and
the set module restart from their values at the start of the set (slot and sampling randomness
seeded by the concept's name, not its position) and every arrived concept of the set is trained
together, so the state after the set's last task does not depend on the order inside the set
(up to float summation order). Earlier sets' slots, proxies and tokens stay frozen: a new set is
added incrementally.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcp.methods.base import Method, TaskBatch, draw_rows, register, token_training
from fastcp.methods.hparams import FLOAT, NATURAL, NONNEG, POS, POSINT, hparam
from fastcp.methods.separate import slot_gates
from fastcp.models.noise import noisy_input_and_target


class SetModule(nn.Module):
    """Set-invariant gating: proxies [K, D] and prompt embeddings [B, D] -> scores [B, K] and
    per-layer gates [L, B, K]. Permuting the proxies permutes the scores' columns, nothing else."""

    def __init__(self, text_dim: int, dim: int, heads: int, layers: int, num_lora_layers: int,
                 gate_scale: float, gate_bias: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"--fl2t_proxy_dim ({dim}) must be divisible by --fl2t_heads ({heads})")
        self.proxy_in = nn.Linear(text_dim, dim)
        self.query = nn.Linear(text_dim, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        # No positional encoding anywhere: the encoder sees a set.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.layer_scale = nn.Parameter(torch.full((num_lora_layers,), float(gate_scale)))
        self.layer_bias = nn.Parameter(torch.full((num_lora_layers,), float(gate_bias)))
        self.dim = dim

    def scores(self, prompt_emb: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        """s [B, K] = ⟨e_b W_q, Enc(P W_p)_k⟩ / √d."""
        h = self.encoder(self.proxy_in(proxies).unsqueeze(0))[0]  # [K, d]
        return self.query(prompt_emb) @ h.T / math.sqrt(self.dim)

    def gates(self, scores: torch.Tensor) -> torch.Tensor:
        """g [L, B, K] = σ(a_l · s + c_l)."""
        return torch.sigmoid(self.layer_scale[:, None, None] * scores[None] + self.layer_bias[:, None, None])


def _name_seed(seed: int, name: str, salt: int = 0) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) + salt * 7919) % (2**62)


@contextlib.contextmanager
def per_layer_coef(layers: dict, coefs: list[torch.Tensor]):
    """Set ``coef`` [B, K] per layer (same order as ``layers``) for the duration."""
    items = list(layers.values())
    saved = [(l.adapter_ids, l.coef) for l in items]
    try:
        for l, c in zip(items, coefs):
            l.adapter_ids, l.coef = None, c
        yield
    finally:
        for l, (a, c) in zip(items, saved):
            l.adapter_ids, l.coef = a, c


@dataclass
class FL2THyperparameters:
    fl2t_set_size: int = hparam(2, NATURAL, "concepts per set, learned concurrently in one routed batch; later sets "
                                "are added without replay (default 2, the smallest set in which concepts learn together; "
                                "1 = every concept alone, i.e. separate adapters plus routing; 0 = the whole sequence "
                                "as one set: every task retrains all earlier concepts on their images, which is replay, "
                                "an offline upper bound outside the continual setting)")
    fl2t_proxy_dim: int = hparam(64, POSINT, "width d of proxies in the set module (default 64)")
    fl2t_heads: int = hparam(4, POSINT, "attention heads of the set module (default 4)")
    fl2t_layers: int = hparam(1, POSINT, "encoder layers of the set module (default 1)")
    fl2t_tau: float = hparam(0.1, POS, "InfoNCE temperature tau_c (default 0.1, CLIP-like)")
    fl2t_nce_weight: float = hparam(0.1, NONNEG, "weight of the InfoNCE term (default 0.1: O(1) loss kept below "
                                    "L_diff's influence)")
    fl2t_keep_weight: float = hparam(10.0, NONNEG, "weight of the routing-keep term, the mean squared change of earlier "
                                     "sets' per-layer coef (text only, no earlier images). Default 10: without it (0) "
                                     "the shared set module learns to switch earlier adapters into old prompts while "
                                     "fitting a new set (fidelity of earlier concepts fell from 1.0 to 0-0.25 in one of "
                                     "3 seeds); 10 makes a gate drift of 0.15 cost about L_diff")
    fl2t_gate_scale: float = hparam(1.0, FLOAT, "initial a_l of g = sigmoid(a_l s + c_l)")
    fl2t_gate_bias: float = hparam(-2.0, FLOAT, "initial c_l (default -2: other concepts' adapters start mostly off, "
                                   "g ~ 0.12)")
    fl2t_learning_rate: float = hparam(1e-3, POS, "learning rate of the proxies and the set module (default 1e-3)")


@register
class FL2T(Method):
    name = "fl2t"
    export_form = "per_concept"
    hyperparameters = FL2THyperparameters
    # A set's concepts are trained together, so the loop hands over every arrived concept's
    # images; only the current set's are used (earlier sets are never replayed).
    sees_all_concepts = True

    def slots_needed(self, num_concepts: int) -> int:
        return num_concepts

    def setup(self, ctx) -> None:
        super().setup(ctx)
        a = self.hp
        self.set_size = int(a.fl2t_set_size) if a.fl2t_set_size else len(ctx.concepts)
        bb = ctx.backbone
        emb = bb.text_encoder.get_input_embeddings().weight
        self.token_ids = [bb.concept_tokens[c.token] for c in ctx.concepts]
        self.token_init = emb.detach()[self.token_ids].clone()
        dev = bb.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.args.seed) + 17)  # the module's init does not depend on the concepts
            self.module = SetModule(emb.shape[1], a.fl2t_proxy_dim, a.fl2t_heads, a.fl2t_layers, len(ctx.layers),
                                    a.fl2t_gate_scale, a.fl2t_gate_bias).to(dev)
        self.proxies = nn.Parameter(self.token_init.clone().float())
        self.module_at_set_start = None
        self.keep_ref = None  # coef [L, J, K] of earlier sets' prompts at the start of the current set
        self.done = -1  # last finished task

    # ------------------------------------------------------------------ sets
    def set_start(self, n: int) -> int:
        return (n // self.set_size) * self.set_size

    @torch.no_grad()
    def _reset_concept(self, k: int) -> None:
        """Slot k, proxy k and token k back to their concept-seeded initial values."""
        c = self.ctx.concepts[k]
        g = torch.Generator().manual_seed(_name_seed(self.args.seed, c.name))
        emb = self.ctx.backbone.text_encoder.get_input_embeddings().weight
        emb[self.token_ids[k]] = self.token_init[k].to(emb)
        self.proxies[k] = self.token_init[k].to(self.proxies)
        for layer in self.ctx.layers.values():
            r = int(layer.ranks[k])
            bound = 1.0 / math.sqrt(layer.in_features)  # Kaiming-uniform(a=√5), as reset_adapter
            layer.lora_a[k].zero_()
            layer.lora_a[k, :r] = ((torch.rand(r, layer.in_features, generator=g) * 2 - 1) * bound).to(layer.lora_a)
            layer.lora_b[k].zero_()

    def begin_task(self, n: int) -> list[dict]:
        self.release_hooks()
        start = self.set_start(n)
        if n == start:
            self.module_at_set_start = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        else:
            self.module.load_state_dict(self.module_at_set_start)
        self.active = list(range(start, n + 1))
        for k in self.active:
            self._reset_concept(k)
        if n == start:
            self.keep_ref = self._earlier_coefs(start, upto=start - 1).detach() if start > 0 else None
        self.task = n
        # Per-concept generators (seeded by name and task): sampling independent of positions.
        self.gens = {k: torch.Generator().manual_seed(_name_seed(self.args.seed, self.ctx.concepts[k].name, n + 1))
                     for k in self.active}
        bb = self.ctx.backbone
        emb = bb.text_encoder.get_input_embeddings().weight
        train_tokens = token_training(self.args)
        emb.requires_grad_(train_tokens)
        tok_mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
        row_mask = torch.zeros(self.proxies.shape[0], 1, device=self.proxies.device)
        slot_mask = torch.zeros(self.proxies.shape[0], device=emb.device)
        for k in self.active:
            tok_mask[self.token_ids[k]] = 1
            row_mask[k] = 1
            slot_mask[k] = 1
        self.proxies.requires_grad_(True)
        self._hooks = [self.proxies.register_hook(lambda g: g * row_mask)]
        if train_tokens:
            self._hooks.append(emb.register_hook(lambda g: g * tok_mask))
        lora = []
        for layer in self.ctx.layers.values():
            for p in (layer.lora_a, layer.lora_b):
                p.requires_grad_(True)
                self._hooks.append(p.register_hook(lambda g, m=slot_mask: g * m.view(-1, *[1] * (g.dim() - 1)).to(g)))
                lora.append(p)
        self.proxies.requires_grad_(True)
        for p in self.module.parameters():
            p.requires_grad_(True)
        return [
            {"params": [emb], "lr": self.args.token_learning_rate, "weight_decay": 0.0} if train_tokens else None,
            {"params": lora, "lr": self.args.learning_rate, "weight_decay": 0.0},
            {"params": [self.proxies, *self.module.parameters()], "lr": self.hp.fl2t_learning_rate, "weight_decay": 0.0},
        ]

    def sample_batch(self, n: int, images: list, batch_size: int) -> TaskBatch:
        """Every arrived concept of the set in one batch, the same number of rows each
        (max(1, batch_size // concepts)); images, noise and timesteps drawn from each concept's
        own generator (so a batch does not depend on the order of the set's concepts)."""
        per = max(1, batch_size // len(self.active))
        n_train = self.ctx.backbone.scheduler.config.num_train_timesteps
        rows, prompts, ids, noise, t = [], [], [], [], []
        for k in self.active:
            idx = torch.randint(0, len(images[k]), (per,), generator=self.gens[k])
            rows.append(draw_rows(images[k], idx, self.gens[k]))
            prompts += [self.ctx.concepts[k].prompt] * per
            ids += [k] * per
        for k, x in zip(self.active, rows):
            noise.append(torch.randn(x.shape, generator=self.gens[k]))
            t.append(torch.randint(0, n_train, (per,), generator=self.gens[k]))
        x = torch.cat(rows)
        return TaskBatch(latents=x, prompts=prompts, task=n, concept_ids=torch.tensor(ids, device=x.device),
                         noise=torch.cat(noise).to(x), timesteps=torch.cat(t).to(x.device))

    # ------------------------------------------------------------------ gating
    def prompt_embeddings(self, prompts: list[str], cond) -> torch.Tensor:
        """e_b [B, D]: hidden state at each prompt's concept token (mean over tokens if none)."""
        ids = self.ctx.backbone.tokenize(prompts)
        hidden = cond.encoder_hidden_states
        concept = torch.zeros_like(ids, dtype=torch.bool)
        for t in self.token_ids:
            concept |= ids == t
        has = concept.any(dim=1)
        pos = concept.float().argmax(dim=1)
        tok = hidden[torch.arange(len(prompts), device=hidden.device), pos]
        return torch.where(has[:, None], tok, hidden.mean(dim=1)).float()

    def prompt_slots(self, prompts: list[str]) -> torch.Tensor:
        """id_b [B] long: the slot of the concept whose token prompt b contains (the first such
        position), -1 if it names none. Read from the text alone, as at generation time."""
        ids = self.ctx.backbone.tokenize(prompts)
        tokens = torch.tensor(self.token_ids, device=ids.device)
        match = ids[:, :, None] == tokens[None, None, :]  # [B, L, K]
        has = match.any(dim=2)  # [B, L]
        first = has.float().argmax(dim=1)  # first position holding a concept token
        slot = match[torch.arange(len(prompts), device=ids.device), first].float().argmax(dim=1)
        return torch.where(has.any(dim=1), slot, torch.full_like(slot, -1))

    def coefs(self, e: torch.Tensor, own: torch.Tensor, upto: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per-layer coef [B, K] list, scores [B, upto+1]) for prompt embeddings e [B, D] whose
        own slots are ``own`` [B] (-1: none); slots of concepts not learned yet (> upto) get 0."""
        K = next(iter(self.ctx.layers.values())).num_adapters
        s = self.module.scores(e, self.proxies[: upto + 1])
        g = self.module.gates(s)  # [L, B, upto+1]
        g = F.pad(g, (0, K - g.shape[-1]))
        onehot = (F.one_hot(own.clamp_min(0), K) * (own >= 0)[:, None]).to(g)
        coef = onehot + (1 - onehot) * g
        return list(coef.unbind(0)), s

    def _earlier_coefs(self, start: int, upto: int) -> torch.Tensor:
        """coef [L, start, K] of the prompts of concepts 0..start-1 (earlier sets) over slots <= upto."""
        prompts = [c.prompt for c in self.ctx.concepts[:start]]
        e = self.prompt_embeddings(prompts, self.ctx.backbone.encode_prompt(prompts))
        coefs, _ = self.coefs(e, self.prompt_slots(prompts).to(e.device), upto)
        return torch.stack(coefs)

    def loss(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        bb = self.ctx.backbone
        cond = bb.encode_prompt(batch.prompts)
        e = self.prompt_embeddings(batch.prompts, cond)
        coefs, s = self.coefs(e, self.prompt_slots(batch.prompts).to(e.device), batch.task)
        nce = batch.share_of_mean(F.cross_entropy(s / self.hp.fl2t_tau, batch.concept_ids, reduction="sum"),
                                  batch.global_rows)
        x_t, target = noisy_input_and_target(bb.scheduler, batch.latents, batch.noise, batch.timesteps,
                                             bb.prediction_type)
        with per_layer_coef(self.ctx.layers, [c.to(x_t.dtype) for c in coefs]):
            pred = bb.unet(x_t, batch.timesteps, **cond.unet_kwargs()).sample
        l_diff = self.diffusion_loss_of(pred, target, batch)
        loss = l_diff + self.hp.fl2t_nce_weight * nce
        out = {"diff": l_diff, "nce": nce}
        if self.keep_ref is not None:
            # over the slots learned so far (<= n): the padded later slots are 0 on both sides, and
            # counting them would make the term depend on how many concepts the sequence has
            learned = slice(0, batch.task + 1)
            out["keep"] = F.mse_loss(self._earlier_coefs(self.keep_ref.shape[1], batch.task)[..., learned],
                                     self.keep_ref[..., learned])
            loss = loss + self.hp.fl2t_keep_weight * out["keep"]
        return {"loss": loss, **out}

    def end_task(self, n: int) -> None:
        self.release_hooks()
        self.proxies.requires_grad_(False)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.done = n

    @torch.no_grad()
    def concept_gates(self, j: int) -> dict[str, torch.Tensor]:
        """{layer: coef [K]} used to generate / score concept j after the last finished task."""
        bb = self.ctx.backbone
        prompt = [self.ctx.concepts[j].prompt]
        e = self.prompt_embeddings(prompt, bb.encode_prompt(prompt))
        upto = max(self.done, j) if self.done >= 0 else j
        coefs, _ = self.coefs(e, self.prompt_slots(prompt).to(e.device), min(upto, len(self.ctx.concepts) - 1))
        return {name: c[0].detach() for name, c in zip(self.ctx.layers, coefs)}

    def generation_routing(self, j: int):
        return slot_gates(self.ctx.layers, self.concept_gates(j))

    def adapter_slot(self, n: int) -> int:
        return n

    def trainable_modules(self) -> dict[str, nn.Module]:
        holder = getattr(self, "_holder", None)
        if holder is None:  # the proxies join the DDP-wrapped model beside the set module
            holder = self._holder = nn.Module()
            holder.module = self.module
            holder.proxies = self.proxies
        return {"fl2t": holder}

    def extension_problem(self) -> str | None:
        if not self.hp.fl2t_set_size:
            return "--fl2t_set_size 0 learns every concept of the sequence as one set; such a run cannot take more concepts"
        return None

    def state_dict(self) -> dict:
        state = {"module": self.module.state_dict(), "proxies": self.proxies.detach(), "done": self.done}
        if self.module_at_set_start is not None:
            state["module_at_set_start"] = self.module_at_set_start
        if self.keep_ref is not None:
            state["keep_ref"] = self.keep_ref
        if getattr(self, "gens", None):  # inside a task: the per-concept generators' positions
            state["gens"] = {str(k): g.get_state() for k, g in self.gens.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        dev = self.proxies.device
        self.module.load_state_dict(state["module"])
        # a finished run extended with more concepts (--extend_run) saved fewer proxies and
        # slots: the new concepts' rows keep their initial values, padded coefs are 0
        proxies = state["proxies"].to(dev)
        self.proxies[: len(proxies)] = proxies
        self.done = int(state["done"])
        if "module_at_set_start" in state:
            self.module_at_set_start = {k: v.to(dev) for k, v in state["module_at_set_start"].items()}
        self.keep_ref = None
        if "keep_ref" in state:
            keep = state["keep_ref"].to(dev)
            self.keep_ref = F.pad(keep, (0, self.proxies.shape[0] - keep.shape[-1]))
        for k, g in state.get("gens", {}).items():
            if int(k) in getattr(self, "gens", {}):
                self.gens[int(k)].set_state(g)
