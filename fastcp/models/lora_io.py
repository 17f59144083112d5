"""Adapter and concept-token files that diffusers loads.

- ``pytorch_lora_weights.safetensors``: one LoRA slot of every ``MultiLoRALinear`` of a UNet, in
  diffusers/peft naming (``unet.<module path>.lora_A.weight`` [r, in], ``.lora_B.weight``
  [out, r]) with the peft ``LoraConfig`` of the adapter (rank, alpha, target modules) in the
  safetensors metadata under ``lora_adapter_metadata``, which ``pipeline.load_lora_weights``
  reads back to get the scale alpha/r right.
- ``learned_embeds.safetensors``: concept-token embeddings ({token: [D]}), diffusers'
  textual-inversion format (``pipeline.load_textual_inversion``).

Writes are atomic (``fastcp.files``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastcp.files import atomic_save_safetensors

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
EMBEDS_NAME = "learned_embeds.safetensors"


def _atomic_save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    atomic_save_safetensors(tensors, path, metadata)


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / LORA_WEIGHTS_NAME if path.suffix != ".safetensors" else path


def lora_state_dict(unet: torch.nn.Module, slot: int = 0, prefix: str = "unet.") -> tuple[dict, dict]:
    """(state dict in diffusers naming, peft LoraConfig dict) of adapter slot ``slot``.

    Each layer contributes only the slot's real rank r_k (padding rows/columns are dropped).
    All layers of one slot share one rank and alpha (peft's ``rank_pattern`` is not needed).
    """
    from fastcp.nn import lora_layers

    layers = lora_layers(unet)
    if not layers:
        raise ValueError("unet: has no MultiLoRALinear layer (inject adapters first)")
    sd, ranks, alphas, targets = {}, set(), set(), set()
    for name, layer in layers.items():
        if not 0 <= slot < layer.num_adapters:
            raise ValueError(f"slot: {slot} out of range for {layer.num_adapters} adapter slot(s)")
        r = int(layer.ranks[slot])
        sd[f"{prefix}{name}.lora_A.weight"] = layer.lora_a[slot, :r].detach().float().cpu().contiguous()
        sd[f"{prefix}{name}.lora_B.weight"] = layer.lora_b[slot, :, :r].detach().float().cpu().contiguous()
        ranks.add(r)
        alphas.add(round(float(layer.scaling[slot]) * r, 6))
        # full module paths (what diffusers infers when a file has no metadata): peft matches a
        # target by suffix, so a bare "to_k" would also wrap every to_k fastcp did not inject
        targets.add(name)
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"slot: layers of slot {slot} differ in rank/alpha ({sorted(ranks)}, {sorted(alphas)})")
    config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(targets),
              "init_lora_weights": True, "use_dora": False, "use_rslora": False, "lora_bias": False}
    return sd, config


def save_lora_adapter(unet: torch.nn.Module, path: str | os.PathLike, *, slot: int = 0,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write slot ``slot`` as ``<path>/pytorch_lora_weights.safetensors`` (or to ``path`` itself if it
    ends in .safetensors). Returns the file path."""
    sd, config = lora_state_dict(unet, slot)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()}),
            "fastcp_rank": str(config["r"]), "fastcp_alpha": str(config["lora_alpha"])}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    out = _weights_path(path)
    _atomic_save_file(sd, out, meta)
    return out


def load_lora_adapter(unet: torch.nn.Module, path: str | os.PathLike, *, slot: int = 0) -> dict:
    """Load a saved adapter into slot ``slot`` of an injected UNet; returns the file's metadata.

    Raises ValueError (one line) when a key is missing or a shape does not match the model.
    """
    from safetensors import safe_open

    from fastcp.nn import lora_layers

    file = _weights_path(path)
    if not file.is_file():
        raise ValueError(f"adapter: {file} does not exist")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("unet: has no MultiLoRALinear layer (inject adapters first)")
    num_slots = next(iter(layers.values())).num_adapters
    if not isinstance(slot, int) or not 0 <= slot < num_slots:
        raise ValueError(f"slot: {slot!r} out of range for {num_slots} adapter slot(s)")
    expected = {f"unet.{n}.lora_{m}.weight" for n in layers for m in "AB"}
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise ValueError(f"adapter {file} does not match the model: missing {missing[:2]}, unexpected {extra[:2]}")
    alpha = None
    if "lora_adapter_metadata" in meta:
        cfg = json.loads(meta["lora_adapter_metadata"])
        alpha = cfg.get("unet.lora_alpha", cfg.get("lora_alpha"))
    # every layer is checked before any slot changes, so a bad file leaves the model as it was
    for name, layer in layers.items():
        a, b = tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or not 1 <= r <= layer.rank or a.shape[1] != layer.in_features \
                or tuple(b.shape) != (layer.out_features, r):
            raise ValueError(
                f"adapter {file} does not match the model: layer {name} expects A [<= {layer.rank}, {layer.in_features}], "
                f"B [{layer.out_features}, r], file has A {list(a.shape)}, B {list(b.shape)}"
            )
    for name, layer in layers.items():
        a, b = tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"]
        r = a.shape[0]
        with torch.no_grad():
            layer.reset_adapter(slot, rank=r, alpha=float(alpha) if alpha is not None else float(r))
            layer.lora_a[slot, :r] = a.to(layer.lora_a.dtype)
            layer.lora_b[slot, :, :r] = b.to(layer.lora_b.dtype)
    return meta


def save_concept_embeddings(backbone, path: str | os.PathLike, tokens: list[str]) -> Path:
    """Write the input embeddings of ``tokens`` as ``<path>/learned_embeds.safetensors``.

    SD 1.x/2.x and tiny: {token: [D]} (diffusers' textual-inversion format). SDXL: one token per
    file as {"clip_l": [1, D1], "clip_g": [1, D2]} with the token in the metadata (the format SDXL
    embeddings are shared in; load each part with ``load_textual_inversion(..., text_encoder=...,
    tokenizer=...)``).
    """
    for tok in tokens:
        if tok not in backbone.concept_tokens:
            raise ValueError(f"tokens: {tok!r} is not a concept token of this backbone")
    path = Path(path)
    file = path / EMBEDS_NAME if path.suffix != ".safetensors" else path
    if backbone.is_sdxl:
        if len(tokens) != 1:
            raise ValueError("tokens: an SDXL embeddings file holds exactly one token")
        out = {}
        for key, (_, encoder), tid in zip(("clip_l", "clip_g"), backbone.text_pairs(), backbone.concept_token_ids(tokens[0])):
            out[key] = encoder.get_input_embeddings().weight[tid].detach().float().cpu().clone()[None]
        _atomic_save_file(out, file, {"token": tokens[0]})
        return file
    table = backbone.text_encoder.get_input_embeddings().weight
    out = {tok: table[backbone.concept_tokens[tok]].detach().float().cpu().clone() for tok in tokens}
    _atomic_save_file(out, file)
    return file


def load_concept_embeddings(backbone, path: str | os.PathLike) -> list[str]:
    """Add (or overwrite) the tokens of a learned_embeds file in the backbone; returns the tokens."""
    from safetensors import safe_open

    path = Path(path)
    file = path / EMBEDS_NAME if path.suffix != ".safetensors" else path
    if not file.is_file():
        raise ValueError(f"embeddings: {file} does not exist")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        data = {k: f.get_tensor(k) for k in f.keys()}
    if set(data) == {"clip_l", "clip_g"}:
        if not backbone.is_sdxl:
            raise ValueError(f"embeddings {file} are SDXL embeddings (clip_l/clip_g); the model is not SDXL")
        per_encoder = {meta.get("token", "<v1>"): [data["clip_l"][0], data["clip_g"][0]]}
    else:
        per_encoder = {tok: [vec] for tok, vec in data.items()}
    for tok, vecs in per_encoder.items():
        backbone.add_concept_token(tok)
        if len(vecs) != len(backbone.text_pairs()):
            raise ValueError(f"embeddings {file}: token {tok} has {len(vecs)} embedding(s), the model has "
                             f"{len(backbone.text_pairs())} text encoder(s)")
        for vec, (_, encoder), tid in zip(vecs, backbone.text_pairs(), backbone.concept_token_ids(tok)):
            table = encoder.get_input_embeddings().weight
            if vec.shape != (table.shape[1],):
                raise ValueError(f"embeddings {file}: token {tok} has shape {list(vec.shape)}, "
                                 f"model expects [{table.shape[1]}]")
            with torch.no_grad():
                table[tid] = vec.to(table)
    return list(per_encoder)
