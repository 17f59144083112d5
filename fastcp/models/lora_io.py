"""Adapter and concept-token files that diffusers loads.

- ``pytorch_lora_weights.safetensors``: one LoRA per targeted linear of a UNet, in diffusers/peft
  naming (``unet.<module path>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r]) with the peft
  ``LoraConfig`` (rank, alpha, target modules, and ``rank_pattern``/``alpha_pattern`` where layers
  differ) in the safetensors metadata under ``lora_adapter_metadata``, which
  ``pipeline.load_lora_weights`` reads back to get the scale alpha/r right. Written from one
  adapter slot of every ``MultiLoRALinear`` (``save_lora_adapter``) or from any per-layer factors
  (``save_lora_factors``, the exported model of ``fastcp.models.export``); ``read_lora_file`` is
  the inverse of both.
- ``learned_embeds.safetensors``: concept-token embeddings ({token: [D]}), diffusers'
  textual-inversion format (``pipeline.load_textual_inversion``).

Writes are atomic (``fastcp.files``).
"""
from __future__ import annotations

import collections
import json
import os
import re
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


#: {layer: (A [r, in], B [out, r])}: one LoRA per layer, ΔW = (alpha / r) · B A
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def slot_factors(unet: torch.nn.Module, slot: int = 0) -> tuple[Factors, dict[str, float]]:
    """(factors, alphas) of adapter slot ``slot`` of every ``MultiLoRALinear`` of ``unet``: A [r_k, in],
    B [out, r_k] (fp32, CPU; only the slot's real rank r_k, padding rows/columns dropped) and
    alpha = scaling_k · r_k per layer, so that ΔW = (alpha / r_k) · B A = scaling_k · B A."""
    from fastcp.nn import lora_layers

    layers = lora_layers(unet)
    if not layers:
        raise ValueError("unet: has no MultiLoRALinear layer (inject adapters first)")
    factors, alphas = {}, {}
    for name, layer in layers.items():
        if not 0 <= slot < layer.num_adapters:
            raise ValueError(f"slot: {slot} out of range for {layer.num_adapters} adapter slot(s)")
        r = int(layer.ranks[slot])
        factors[name] = (layer.lora_a[slot, :r].detach().float().cpu().contiguous(),
                         layer.lora_b[slot, :, :r].detach().float().cpu().contiguous())
        alphas[name] = round(float(layer.scaling[slot]) * r, 6)
    return factors, alphas


def _most_common(values: dict[str, float]):
    return collections.Counter(values.values()).most_common(1)[0][0]


def lora_file_contents(factors: Factors, alphas: dict[str, float] | None = None, prefix: str = "unet.") -> tuple[dict, dict]:
    """(state dict in diffusers naming, peft ``LoraConfig`` dict) of per-layer LoRA factors.

    Keys ``<prefix><layer>.lora_A.weight`` [r_l, in] and ``.lora_B.weight`` [out, r_l].
    ``alphas`` {layer: alpha_l} (default alpha_l = r_l: scale 1, B carries any scale). The config
    holds the most common rank and alpha as ``r``/``lora_alpha`` and the other layers in peft's
    ``rank_pattern``/``alpha_pattern``, keyed by the escaped full module path: peft matches a
    pattern key as a regex against the end of each module name, and a bare name like ``to_k``
    would match every to_k of the UNet.
    """
    if not factors:
        raise ValueError("factors: no layer to save")
    ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
    alphas = {name: float(ranks[name]) for name in factors} if alphas is None else {n: float(alphas[n]) for n in factors}
    sd = {}
    for name, (a, b) in factors.items():
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"factors: layer {name} has A {list(a.shape)}, B {list(b.shape)}; expected [r, in], [out, r]")
        sd[f"{prefix}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        sd[f"{prefix}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    r, alpha = _most_common(ranks), _most_common(alphas)
    config = {"r": r, "lora_alpha": alpha,
              # full module paths (what diffusers infers when a file has no metadata): peft matches a
              # target by suffix, so a bare "to_k" would also wrap every to_k fastcp did not inject
              "target_modules": sorted(factors),
              "rank_pattern": {re.escape(n): v for n, v in sorted(ranks.items()) if v != r},
              "alpha_pattern": {re.escape(n): v for n, v in sorted(alphas.items()) if v != alpha},
              "init_lora_weights": True, "use_dora": False, "use_rslora": False, "lora_bias": False}
    return sd, config


def lora_state_dict(unet: torch.nn.Module, slot: int = 0, prefix: str = "unet.") -> tuple[dict, dict]:
    """(state dict in diffusers naming, peft LoraConfig dict) of adapter slot ``slot``."""
    return lora_file_contents(*slot_factors(unet, slot), prefix=prefix)


def save_lora_factors(factors: Factors, path: str | os.PathLike, *, alphas: dict[str, float] | None = None,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write per-layer LoRA factors as ``<path>/pytorch_lora_weights.safetensors`` (or to ``path``
    itself if it ends in .safetensors), the peft config in the metadata (``lora_file_contents``).
    Returns the file path."""
    sd, config = lora_file_contents(factors, alphas)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()}),
            "fastcp_rank": str(config["r"]), "fastcp_alpha": str(config["lora_alpha"])}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    out = _weights_path(path)
    _atomic_save_file(sd, out, meta)
    return out


def save_lora_adapter(unet: torch.nn.Module, path: str | os.PathLike, *, slot: int = 0,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write slot ``slot`` as ``<path>/pytorch_lora_weights.safetensors`` (or to ``path`` itself if it
    ends in .safetensors). Returns the file path."""
    factors, alphas = slot_factors(unet, slot)
    return save_lora_factors(factors, path, alphas=alphas, metadata=metadata)


def _pattern_value(patterns: dict, name: str, default):
    """peft's rule (``peft.utils.other.get_pattern_key``): the first key that matches the end of the
    module name as a regex, after an optional dotted prefix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_lora_file(path: str | os.PathLike) -> tuple[Factors, dict[str, float], dict[str, str]]:
    """(factors, scales, metadata) of a ``pytorch_lora_weights.safetensors`` in diffusers/peft
    naming (``unet.`` prefix): A [r_l, in], B [out, r_l] per layer and scale_l = alpha_l / r_l
    (alpha from ``lora_alpha``/``alpha_pattern`` of the metadata; alpha = r_l without metadata, the
    diffusers convention), so that ΔW_l = scale_l · B A. One-line ValueError for a missing file or
    keys that are not LoRA pairs."""
    from safetensors import safe_open

    file = _weights_path(path)
    if not file.is_file():
        raise ValueError(f"adapter: {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file: safetensors' own error names no file
        raise ValueError(f"adapter: cannot read {file}: {str(exc).splitlines()[0]}") from exc
    names = sorted({k[len("unet."):-len(".lora_A.weight")] for k in tensors
                    if k.startswith("unet.") and k.endswith(".lora_A.weight")})
    expected = {f"unet.{n}.lora_{m}.weight" for n in names for m in "AB"}
    if not names or set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise ValueError(f"adapter {file}: not a diffusers UNet LoRA file (unpaired or foreign keys, e.g. {odd[:2]})")
    cfg = {}
    if "lora_adapter_metadata" in meta:
        raw = json.loads(meta["lora_adapter_metadata"])
        cfg = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in raw.items()}
    factors, scales = {}, {}
    for n in names:
        a, b = tensors[f"unet.{n}.lora_A.weight"], tensors[f"unet.{n}.lora_B.weight"]
        r = a.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, n, cfg.get("lora_alpha", r))
        factors[n], scales[n] = (a, b), float(alpha) / r
    return factors, scales, meta


def load_lora_adapter(unet: torch.nn.Module, path: str | os.PathLike, *, slot: int = 0) -> dict:
    """Load a saved adapter into slot ``slot`` of an injected UNet; returns the file's metadata.

    Raises ValueError (one line) when a key is missing or a shape does not match the model.
    """
    from fastcp.nn import lora_layers

    file = _weights_path(path)
    factors, scales, meta = read_lora_file(file)
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("unet: has no MultiLoRALinear layer (inject adapters first)")
    num_slots = next(iter(layers.values())).num_adapters
    if not isinstance(slot, int) or not 0 <= slot < num_slots:
        raise ValueError(f"slot: {slot!r} out of range for {num_slots} adapter slot(s)")
    if set(factors) != set(layers):
        missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
        raise ValueError(f"adapter {file} does not match the model: missing {missing[:2]}, unexpected {extra[:2]}")
    # every layer is checked before any slot changes, so a bad file leaves the model as it was
    for name, layer in layers.items():
        a, b = factors[name]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or not 1 <= r <= layer.rank or a.shape[1] != layer.in_features \
                or tuple(b.shape) != (layer.out_features, r):
            raise ValueError(
                f"adapter {file} does not match the model: layer {name} expects A [<= {layer.rank}, {layer.in_features}], "
                f"B [{layer.out_features}, r], file has A {list(a.shape)}, B {list(b.shape)}"
            )
    for name, layer in layers.items():
        a, b = factors[name]
        r = a.shape[0]
        with torch.no_grad():
            layer.reset_adapter(slot, rank=r, alpha=scales[name] * r)
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
