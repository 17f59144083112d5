"""Batched diffusion-classifier (DC) scores (DESIGN.md section 7).

    err[n, k, t] = mean_pixels ( target − ε_θ(√ᾱ_t·x_n + √(1−ᾱ_t)·ε_{n,t}, t, cond_k) )²

with target = ε (epsilon prediction) or v = √ᾱ_t·ε − √(1−ᾱ_t)·x (v-prediction), and the **same
noise ε_{n,t} for every concept k**. Instead of one UNet call per (image, concept, timestep),
rows are packed into large UNet batches:

- the noisy input is computed once per (image, timestep) and shared by every concept;
- each prompt is encoded once (the caller passes a Conditioning with K rows);
- cross-attention keys/values are projected once per concept per call and gathered per row
  (``fastcp.dc.kv_cache``), not once per row;
- the UNet work before the first cross-attention block (time embedding, conv_in, the
  full-resolution down blocks of the tiny model) runs once per (image, timestep) and is expanded
  to the concepts (``fastcp.dc.shared_prefix``) — where that prefix holds a down block; on SD 1.5
  it stops before ``down_blocks[0]`` and would save ~0% of the FLOPs for the cost of its gathers;
- concept k's rows run through LoRA slot ``adapter_ids[k]`` of the multi-adapter layers (-1 =
  base model), so every concept's adapter is evaluated in the same batch;
- rows are chunked to ``batch_size`` (or a byte budget) with identical results for any chunking;
  within a chunk they are ordered concept-major, concepts sorted by adapter slot (base-only
  last), so each adapter's rows are one contiguous run: the routing plan is built once per chunk
  without a sort and the LoRA kernels read rows in place (no gather). Every index is arithmetic on
  the device: no ``unique``, no host sync per chunk;
- ``channels_last`` and ``compile`` (UNet blocks compiled one by one) are engine options.

``errors_loop`` is the plain per-(image, concept, timestep) loop the engine is tested against.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fastcp.dc import shared_prefix
from fastcp.dc.kv_cache import CachedCrossAttnProcessor, cached_cross_attention
from fastcp.models.backbone import Conditioning
from fastcp.nn import lora_layers, lora_routing


def _as_conditioning(cond) -> Conditioning:
    if isinstance(cond, Conditioning):
        return cond
    if torch.is_tensor(cond) and cond.dim() == 3:
        return Conditioning(cond)
    raise ValueError("cond: expected a Conditioning or a tensor [K, L, D]")


def _check(latents, cond: Conditioning, timesteps, noise, adapter_ids, scheduler=None):
    """Validate shapes; returns (N, K, T, noise as [N, T, C, H, W])."""
    if not torch.is_tensor(latents) or latents.dim() != 4 or latents.shape[0] == 0:
        raise ValueError(f"latents: expected [N >= 1, C, H, W], got {list(getattr(latents, 'shape', []))}")
    N, K = latents.shape[0], len(cond)
    if K == 0:
        raise ValueError("cond: expected at least one concept row")
    if cond.encoder_hidden_states.dim() != 3:
        raise ValueError(f"cond: expected encoder_hidden_states [K, L, D], got {list(cond.encoder_hidden_states.shape)}")
    if not torch.is_tensor(timesteps) or timesteps.dim() != 1 or timesteps.dtype not in (torch.int32, torch.int64) \
            or timesteps.numel() == 0:
        raise ValueError(f"timesteps: expected a non-empty 1-D integer tensor [T], got "
                         f"{getattr(timesteps, 'dtype', type(timesteps))} {list(getattr(timesteps, 'shape', []))}")
    if scheduler is not None:
        n_train = len(scheduler.alphas_cumprod)
        if int(timesteps.min()) < 0 or int(timesteps.max()) >= n_train:
            raise ValueError(f"timesteps: expected values in [0, {n_train}), got [{int(timesteps.min())}, "
                             f"{int(timesteps.max())}]")
    T = timesteps.shape[0]
    if not torch.is_tensor(noise):
        raise ValueError(f"noise: expected a tensor, got {type(noise).__name__}")
    if noise.shape == (T, *latents.shape[1:]):
        noise = noise.unsqueeze(0).expand(N, *noise.shape)
    elif noise.shape != (N, T, *latents.shape[1:]):
        raise ValueError(f"noise: expected [T, C, H, W] or [N, T, C, H, W] with N={N}, T={T}, got {list(noise.shape)}")
    if adapter_ids is not None and (not torch.is_tensor(adapter_ids) or adapter_ids.dim() != 1
                                    or adapter_ids.shape[0] != K or adapter_ids.is_floating_point()):
        raise ValueError(f"adapter_ids: expected an integer tensor [K={K}], got {list(getattr(adapter_ids, 'shape', []))}")
    return N, K, T, noise


def _noisy_and_target(scheduler, latents, noise, timesteps):
    """x_t [N, T, C, H, W] (once per image and timestep) and the regression target."""
    acp = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps.to(latents.device)]
    T = timesteps.shape[0]
    sa = acp.sqrt().view(1, T, 1, 1, 1).to(latents.dtype)
    sb = (1 - acp).sqrt().view(1, T, 1, 1, 1).to(latents.dtype)
    x = latents.unsqueeze(1)
    noisy = sa * x + sb * noise
    v_pred = scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    return noisy, (sa * noise - sb * x if v_pred else noise)


# Activation bytes per UNet row as a multiple of its input bytes, for ``max_batch_bytes``
# (see ``DiffusionClassifier._chunk_rows``): without grad only a few feature maps and the skip
# connections are alive at once; with grad every saved activation is.
ACTIVATION_FACTOR_NO_GRAD = 300
ACTIVATION_FACTOR_GRAD = 1000


@dataclass
class ClassifyResult:
    """pred [N] (index into the K concepts), errors [N, K, T_total] (NaN where pruned),
    timesteps [T_total] in evaluation order, alive [N, K] (concepts kept to the last stage)."""

    pred: torch.Tensor
    errors: torch.Tensor
    timesteps: torch.Tensor
    alive: torch.Tensor


class DiffusionClassifier:
    """DC scores of a (LoRA-injected or plain) diffusers UNet.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (optionally with MultiLoRALinear layers).
        scheduler: its noise scheduler (``alphas_cumprod``, ``config.prediction_type``).
        temperature: τ of ``logits = −mean_t err / τ``.
        kv_cache: project cross-attention K/V once per concept (exact; on by default).
        share_prefix: compute the prompt-independent first blocks once per (image, timestep)
            (exact; on by default where the UNet configuration allows it and the prefix holds at
            least one down block, i.e. where it saves work: ``shared_prefix.saves_work``).
        channels_last: convert the UNet (in place) and its inputs to channels_last, the layout
            cuDNN's convolutions prefer on tensor cores.
        compile: compile the UNet's blocks in place (``Module.compile``, one per block, so the
            shared-prefix forward, which calls the blocks directly, runs compiled as well).
    """

    def __init__(self, unet, scheduler, temperature: float = 1.0, kv_cache: bool = True, share_prefix: bool = True,
                 channels_last: bool = False, compile: bool = False):
        self.unet, self.scheduler, self.temperature, self.kv_cache = unet, scheduler, temperature, kv_cache
        self.share_prefix = share_prefix and shared_prefix.supports(unet) and shared_prefix.saves_work(unet)
        self.channels_last, self.compile = channels_last, compile
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if compile and not getattr(unet, "_fastcp_blocks_compiled", False):
            compile_blocks(unet)

    def _chunk_rows(self, rows: int, per_row_bytes: int, batch_size, max_batch_bytes) -> int:
        """UNet rows per call: ``batch_size``, else as many as ``max_batch_bytes`` allows, else all."""
        if batch_size is not None:
            if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
                raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
            return int(batch_size)
        if max_batch_bytes is not None:
            if max_batch_bytes <= 0:
                raise ValueError(f"max_batch_bytes: expected a positive number, got {max_batch_bytes!r}")
            # A rough guide, not a guarantee: activation bytes per row as a multiple of the row's
            # input bytes. With grad, the tensors autograd keeps for one row of the tiny backbone
            # measured 657x its input; SD-1.5 at 32x32 latents measured ~29,000x (CPU SDPA keeps
            # the attention maps). Use batch_size for exact control on large models.
            factor = ACTIVATION_FACTOR_GRAD if torch.is_grad_enabled() else ACTIVATION_FACTOR_NO_GRAD
            return max(1, int(max_batch_bytes // (factor * per_row_bytes)))
        return rows

    def errors(self, latents: torch.Tensor, cond, timesteps: torch.Tensor, noise: torch.Tensor,
               adapter_ids: torch.Tensor | None = None, batch_size: int | None = None,
               max_batch_bytes: int | None = None) -> torch.Tensor:
        """[N, K, T] denoising errors (module docstring). Works with and without grad.

        latents [N, C, H, W]; cond: Conditioning (or tensor [K, L, D]) with one row per concept;
        timesteps [T] long; noise [T, C, H, W] (shared by all images) or [N, T, C, H, W];
        adapter_ids [K] long or None; batch_size caps UNet rows per call.
        """
        cond = _as_conditioning(cond)
        N, K, T, noise = _check(latents, cond, timesteps, noise, adapter_ids, self.scheduler)
        dev = latents.device
        noisy, target = _noisy_and_target(self.scheduler, latents, noise, timesteps)
        rows = N * K * T
        # Global row r = ((n * T) + t) * K + k: the K rows of one (image, timestep) pair are adjacent, so a
        # chunk [s, e) covers the contiguous pairs s // K .. (e - 1) // K and shares the prompt-independent
        # prefix of each across its concepts.
        chunk = self._chunk_rows(rows, latents[0].numel() * latents.element_size(), batch_size, max_batch_bytes)
        layers = lora_layers(self.unet)
        # LoRA inside the shared prefix (e.g. on time_emb_proj) makes it concept-dependent.
        share = (self.share_prefix and cond.added_cond_kwargs is None
                 and not shared_prefix.lora_in_prefix(self.unet, layers))
        ids_dev = adapter_ids.to(dev).long() if adapter_ids is not None else None
        # Concept rank: concepts sorted by adapter slot, base-only (-1) last. Rows of a chunk are laid out
        # by (rank, global row), so the chunk's adapter ids are grouped ascending: a presorted plan.
        if ids_dev is not None:
            key = torch.where(ids_dev < 0, torch.full_like(ids_dev, 1 << 30), ids_dev)
            k_rank = torch.argsort(torch.argsort(key, stable=True))
        else:
            k_rank = torch.arange(K, device=dev)
        processor = CachedCrossAttnProcessor() if self.kv_cache else None
        cache_ctx = cached_cross_attention(self.unet, processor) if processor is not None else contextlib.nullcontext()
        ts = timesteps.to(dev)
        out, where = [], []
        with cache_ctx:
            if processor is not None:
                processor.concept_adapter_ids = ids_dev
            for s in range(0, rows, chunk):
                e = min(s + chunk, rows)
                pos = torch.arange(s, e, device=dev)
                order = torch.argsort(k_rank[pos % K] * (e - s) + (pos - s))  # concept-major, stable by row
                pos = pos[order]
                pair, k = pos // K, pos % K
                n, t = pair // T, pair % T
                where.append(pos)
                route = (lora_routing(self.unet, adapter_ids=ids_dev[k], presorted=True)
                         if layers and ids_dev is not None else contextlib.nullcontext())
                if processor is not None:
                    processor.row_concept = k
                    kwargs = {"encoder_hidden_states": cond.encoder_hidden_states}  # compact: one row per concept
                    if cond.added_cond_kwargs is not None:
                        kwargs["added_cond_kwargs"] = {a: v[k] for a, v in cond.added_cond_kwargs.items()}
                else:
                    kwargs = cond.select(k).unet_kwargs()
                with route:
                    if share:
                        first = s // K  # the chunk's pairs are first .. (e - 1) // K: no unique() needed
                        uniq = torch.arange(first, (e - 1) // K + 1, device=dev)
                        pred = shared_prefix.forward_shared_prefix(
                            self.unet, self._layout(noisy[uniq // T, uniq % T]), ts[uniq % T], pair - first,
                            kwargs["encoder_hidden_states"])
                    else:
                        pred = self.unet(self._layout(noisy[n, t]), ts[t], **kwargs).sample
                out.append(((pred.float() - target[n, t].float()) ** 2).mean(dim=(1, 2, 3)))
        # back to (n, t, k) order: one scatter of the per-row errors (differentiable)
        flat = torch.zeros(rows, dtype=out[0].dtype, device=dev).index_copy(0, torch.cat(where), torch.cat(out))
        return flat.view(N, T, K).transpose(1, 2)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def logits(self, *args, **kwargs) -> torch.Tensor:
        """[N, K] = −mean_t err / τ."""
        return -self.errors(*args, **kwargs).mean(dim=2) / self.temperature

    @torch.no_grad()
    def classify(self, latents: torch.Tensor, cond, *, stages=((8, None),), adapter_ids=None,
                 generator: torch.Generator | None = None, batch_size: int | None = None) -> ClassifyResult:
        """Top-1 concept per image with the staged pruning of Li et al. (2023).

        ``stages`` = [(n_t, keep), ...]: each stage adds n_t timesteps (new ones, spread evenly
        over the schedule and interleaved with those already evaluated; earlier errors are
        reused), then keeps the ``keep`` concepts with the lowest mean error so far per image
        (None = keep all). The winner is the lowest mean error after the last stage.
        """
        cond = _as_conditioning(cond)
        if not torch.is_tensor(latents) or latents.dim() != 4 or latents.shape[0] == 0:
            raise ValueError(f"latents: expected [N >= 1, C, H, W], got {list(getattr(latents, 'shape', []))}")
        try:
            stages = [(int(n_t), None if keep is None else int(keep)) for n_t, keep in stages]
        except (TypeError, ValueError):
            raise ValueError(f"stages: expected a list of (n_timesteps, keep) pairs, got {stages!r}") from None
        if not stages or any(n_t < 1 or (keep is not None and keep < 1) for n_t, keep in stages):
            raise ValueError(f"stages: expected a non-empty list of (n_timesteps >= 1, keep >= 1 or None), got {stages}")
        N, K = latents.shape[0], len(cond)
        if adapter_ids is not None and (not torch.is_tensor(adapter_ids) or adapter_ids.shape != (K,)):
            raise ValueError(f"adapter_ids: expected [K={K}], got {list(getattr(adapter_ids, 'shape', []))}")
        total = sum(n_t for n_t, _ in stages)
        n_train = self.scheduler.config.num_train_timesteps
        if total > n_train:
            raise ValueError(f"stages: {total} timesteps in all, the schedule has {n_train}")
        # Evenly spaced grid over the schedule, visited in a bit-reversal-like order so each
        # stage's new timesteps fill gaps between the earlier ones.
        grid = torch.linspace(0, n_train - 1, total + 2)[1:-1].round().long()
        order = sorted(range(total), key=lambda i: _van_der_corput(i))
        all_t = grid[order]
        # Drawn on the CPU so the result depends on the seed only, not on the device.
        noise = torch.randn((N, total, *latents.shape[1:]), generator=generator, device="cpu").to(latents)
        errors = torch.full((N, K, total), float("nan"), device=latents.device)
        alive = torch.ones(N, K, dtype=torch.bool, device=latents.device)
        done = 0
        for n_t, keep in stages:
            sl = slice(done, done + n_t)
            # Images whose surviving concept sets are equal go through the engine together
            # (before any pruning that is all of them: one call for the whole stage).
            patterns, group = torch.unique(alive, dim=0, return_inverse=True)
            for g in range(patterns.shape[0]):
                imgs = (group == g).nonzero().squeeze(1)
                ks = patterns[g].nonzero().squeeze(1)
                ids = adapter_ids[ks.to(adapter_ids.device)] if adapter_ids is not None else None
                err = self.errors(latents[imgs], cond.select(ks), all_t[sl].to(latents.device), noise[imgs, sl],
                                  adapter_ids=ids, batch_size=batch_size)
                errors[imgs[:, None], ks[None, :], sl] = err.to(errors.dtype)
            done += n_t
            if keep is not None:
                mean = errors[:, :, :done].nanmean(dim=2).masked_fill(~alive, float("inf"))
                kth = mean.topk(min(keep, K), dim=1, largest=False).indices
                alive = torch.zeros_like(alive).scatter_(1, kth, True) & alive
        mean = errors[:, :, :done].nanmean(dim=2).masked_fill(~alive, float("inf"))
        return ClassifyResult(pred=mean.argmin(dim=1), errors=errors, timesteps=all_t, alive=alive)


def compile_blocks(unet) -> None:
    """Compile (in place) every block the engine calls, in both the plain and the shared-prefix forward."""
    for m in (unet.time_embedding, unet.conv_in, *unet.down_blocks, unet.mid_block, *unet.up_blocks, unet.conv_out):
        if m is not None:
            m.compile()
    unet._fastcp_blocks_compiled = True


def _van_der_corput(i: int) -> float:
    """Base-2 radical inverse: 0, 1/2, 1/4, 3/4, ... (spreads any prefix evenly)."""
    v, denom = 0.0, 1.0
    while i:
        denom *= 2
        v += (i & 1) / denom
        i >>= 1
    return v


def errors_loop(unet, scheduler, latents, cond, timesteps, noise, adapter_ids=None) -> torch.Tensor:
    """The plain loop: one UNet call per (image, concept, timestep). [N, K, T]. The spec of
    ``DiffusionClassifier.errors`` and its baseline in the benchmarks."""
    cond = _as_conditioning(cond)
    N, K, T, noise = _check(latents, cond, timesteps, noise, adapter_ids, scheduler)
    has_lora = bool(lora_layers(unet))
    rows = []
    for n in range(N):
        for k in range(K):
            one = torch.tensor([k], device=latents.device)
            for t in range(T):
                route = (lora_routing(unet, adapter_ids=adapter_ids[k: k + 1].to(latents.device))
                         if has_lora and adapter_ids is not None else contextlib.nullcontext())
                noisy, target = _noisy_and_target(scheduler, latents[n: n + 1], noise[n: n + 1, t: t + 1],
                                                  timesteps[t: t + 1])
                with route:
                    pred = unet(noisy[:, 0], timesteps[t: t + 1].to(latents.device), **cond.select(one).unet_kwargs()).sample
                rows.append(((pred.float() - target[:, 0].float()) ** 2).mean())
    return torch.stack(rows).view(N, K, T)  # rows were appended in (n, k, t) order
