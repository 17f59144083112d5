"""Share the UNet work that does not depend on the prompt across the concepts of a DC batch.

In a DC batch the rows (image n, concept k, timestep t) differ in their prompt only from the first
cross-attention block on. Everything before it — the time embedding, ``conv_in`` and every down
block without cross-attention (the full-resolution blocks of the tiny model) — depends on (n, t)
alone, so it is computed once per unique (n, t) and then expanded to the rows, together with the
skip connections the up blocks will read. The rest of the forward is diffusers' own block code,
called in the same order as ``UNet2DConditionModel.forward``.

Only the plain text-conditioned configuration is handled (no class / added embeddings, no
ControlNet or adapter residuals); ``supports(unet)`` says whether a UNet qualifies, and the engine
falls back to the standard forward otherwise.
"""
from __future__ import annotations

import torch


def supports(unet) -> bool:
    """Whether the UNet's configuration is the plain text-conditioned one this module reproduces."""
    cfg = unet.config
    return (getattr(cfg, "class_embed_type", None) is None and getattr(cfg, "addition_embed_type", None) is None
            and getattr(cfg, "encoder_hid_dim_type", None) is None and unet.__class__.__name__ == "UNet2DConditionModel")


def prefix_modules(unet) -> list[str]:
    """Qualified names of the submodules run once per (image, timestep): the time embedding,
    ``conv_in`` and the down blocks before the first one with cross-attention (all of them if none
    has it)."""
    names = ["time_proj", "time_embedding", "conv_in"]
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            break
        names.append(f"down_blocks.{i}")
    return names


def saves_work(unet) -> bool:
    """Whether sharing the prefix saves real work: it must hold at least one down block. On SD 1.5 /
    SDXL every down block from the first has cross-attention (SD 1.5) or the prefix ends at conv_in,
    so sharing would save the time embedding and one 3×3 convolution (~0% of a pass, see
    ``prefix_flops``) and pay for expanding the skip tensors; the engine then runs the plain forward."""
    return len(prefix_modules(unet)) > 3


def prefix_flops(unet, sample_shape, encoder_hidden_states_shape) -> dict:
    """FLOPs of one UNet pass (one row) and of its shareable prefix, counted on the meta device (no
    compute, any size): {"total": int, "prefix": int, "fraction": prefix / total}. What sharing the
    prefix across K concepts saves is (1 − 1/K) · fraction of the engine's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    # a fresh copy of the architecture on the meta device: no memory, no compute (LoRA layers, if any,
    # are left out: they add r/in of a projection's FLOPs)
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    x = torch.zeros(1, *sample_shape, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    ehs = torch.zeros(1, *encoder_hidden_states_shape, device="meta")
    with torch.no_grad():
        total = FlopCounterMode(display=False)
        with total:
            meta(x, t, encoder_hidden_states=ehs)
        pre = FlopCounterMode(display=False)
        with pre:
            emb = meta.time_embedding(meta.get_time_embed(sample=x, timestep=t), None)
            h = meta.conv_in(x)
            for block in meta.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    break
                h, _ = block(hidden_states=h, temb=emb)
    tot, prf = int(total.get_total_flops()), int(pre.get_total_flops())
    return {"total": tot, "prefix": prf, "fraction": prf / tot if tot else 0.0}


def lora_in_prefix(unet, layer_names) -> list[str]:
    """The LoRA layers (by qualified name) that sit in the shared prefix. Their output depends on
    the concept's adapter, so the prefix is no longer prompt-independent and must not be shared."""
    prefixes = prefix_modules(unet)
    return [n for n in layer_names if any(n == p or n.startswith(p + ".") for p in prefixes)]


def forward_shared_prefix(unet, sample: torch.Tensor, timesteps: torch.Tensor, expand: torch.Tensor,
                          encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """ε_θ for rows built from unique inputs.

    sample [U, C, H, W] and timesteps [U]: the unique (image, timestep) inputs; expand [R] long:
    row r uses unique input expand[r]; encoder_hidden_states: what the cross-attention processors
    expect (per row, or the compact per-concept tensor of the K/V-cache processor). Returns [R, C, H, W].
    """
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    up_factor = 2 ** unet.num_upsamplers
    upsample_size = None
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(sample)
    res = (h,)
    expanded = False

    def expand_all(h, emb, res):
        return h[expand], emb[expand], tuple(r[expand] for r in res)

    for block in unet.down_blocks:
        cross = getattr(block, "has_cross_attention", False)
        if cross and not expanded:  # from here on the prompt matters: one row per (n, k, t)
            h, emb, res = expand_all(h, emb, res)
            expanded = True
        if cross:
            h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, r = block(hidden_states=h, temb=emb)
        res += r
    if not expanded:
        h, emb, res = expand_all(h, emb, res)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = unet.mid_block(h, emb)
    for i, block in enumerate(unet.up_blocks):
        r = res[-len(block.resnets):]
        res = res[: -len(block.resnets)]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = res[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=r, encoder_hidden_states=encoder_hidden_states,
                      upsample_size=upsample_size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=r, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
