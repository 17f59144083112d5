"""``--init_lora``: start the first task from an existing LoRA file instead of a fresh adapter.

The file is a diffusers/peft ``pytorch_lora_weights.safetensors`` (or a folder holding one):
``unet.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r], with the peft
config (alpha) in its metadata, the format ``pipeline.save_lora_weights`` and diffusers'
dreambooth-LoRA scripts write, and the one fastcp writes for every task. It is loaded with
``lora_io.load_lora_adapter`` into the slot task 1 trains, after the method's ``begin_task(0)``
has initialised that slot and before the optimizer is built (``ContinualTrainer.train_task``).

``check_init_lora`` validates the file against the model before anything is written, so a bad
file is one line and exit 2: it must exist, be safetensors, hold the diffusers/peft UNet keys
of exactly the layers this run puts LoRA on (a file that covers fewer or other layers is refused,
not half-applied: the missing layers would silently start fresh), with one rank r <= --rank (the
slot then trains at rank r, with the file's alpha). kohya / A1111 files (``lora_unet_...``) and
text-encoder LoRA are refused with a one-line hint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import nn

from fastcp.models.lora_io import _weights_path


def init_lora_file(path: str | os.PathLike) -> Path:
    """The weights file of ``--init_lora``: the path itself if it ends in .safetensors, else
    ``<folder>/pytorch_lora_weights.safetensors`` (``lora_io``'s rule)."""
    return _weights_path(path)


def init_lora_sha256(path: str | os.PathLike | None) -> str | None:
    """sha256 of the ``--init_lora`` file's bytes (None without one): the run fingerprint holds it,
    so a resume with another starting adapter is refused while a moved copy is accepted."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(init_lora_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_target_names(args, method=None) -> tuple[str, ...]:
    """The module-name suffixes the run puts LoRA on: the method's targets, plus the feed-forward
    linears under ``--lora_targets attn_ff`` (``ContinualTrainer.setup`` injects exactly these)."""
    from fastcp.methods import get_method
    from fastcp.nn import FEEDFORWARD_TARGETS

    targets = tuple((method or get_method(args.method)(args)).lora_targets)
    return targets + FEEDFORWARD_TARGETS if args.lora_targets == "attn_ff" else targets


def check_init_lora(path: str | os.PathLike, unet: nn.Module, targets: tuple[str, ...], max_rank: int) -> Path:
    """Validate an ``--init_lora`` file against a UNet that has no adapters yet; returns the file.

    ``targets``: the suffixes ``inject_multi_lora`` will match (``lora_target_names``). Raises a
    one-line ValueError; nothing in the model changes.
    """
    from safetensors import safe_open

    from fastcp.nn.multi_lora import matches_target

    file = init_lora_file(path)
    if not file.is_file():
        raise ValueError(f"--init_lora: {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # any reason the file is not readable safetensors
        raise ValueError(f"--init_lora: {file} is not a safetensors file ({type(exc).__name__})") from None
    if any(k.startswith(("lora_unet_", "lora_te")) for k in shapes):
        raise ValueError(f"--init_lora: {file} is a kohya/A1111 LoRA (lora_unet_* keys), which fastcp does not read; "
                         "convert it to diffusers format first (pipeline.load_lora_weights, then save_lora_weights)")
    if any(k.startswith("text_encoder") for k in shapes):
        raise ValueError(f"--init_lora: {file} also holds text-encoder LoRA, which fastcp does not train; "
                         "give a UNet-only LoRA file")
    if "lora_adapter_metadata" in meta:
        try:
            cfg = json.loads(meta["lora_adapter_metadata"])
            alpha = float(cfg.get("unet.lora_alpha", cfg.get("lora_alpha", 1.0)))  # what load_lora_adapter reads
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"--init_lora: {file} has unreadable lora_adapter_metadata (peft config)") from None
        if not alpha > 0:
            raise ValueError(f"--init_lora: {file} has lora_alpha {alpha}; it must be > 0")
        if any(cfg.get(k) for k in ("unet.rank_pattern", "unet.alpha_pattern", "rank_pattern", "alpha_pattern")):
            raise ValueError(f"--init_lora: {file} has per-layer ranks or alphas (peft rank_pattern/alpha_pattern); "
                             "fastcp's adapter slot has one rank and alpha")
    linears = {n: m for n, m in unet.named_modules()
               if isinstance(m, nn.Linear) and ".base" not in n and matches_target(unet, n, targets)}
    expected = {f"unet.{n}.lora_{m}.weight" for n in linears for m in "AB"}
    if set(shapes) != expected:
        missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
        raise ValueError(
            f"--init_lora: {file} does not cover the layers this run trains ({len(missing)} key(s) missing, e.g. "
            f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}); diffusers-style keys unet.<module>.lora_A/B.weight "
            f"are expected, and --lora_targets (attn: attention projections; attn_ff: + feed-forward) must match the file")
    ranks = set()
    for n, layer in linears.items():
        a, b = shapes[f"unet.{n}.lora_A.weight"], shapes[f"unet.{n}.lora_B.weight"]
        if len(a) != 2 or len(b) != 2 or a[1] != layer.in_features or b != (layer.out_features, a[0]):
            raise ValueError(f"--init_lora: {file} does not match the model: layer {n} is [{layer.out_features}, "
                             f"{layer.in_features}], the file has A {list(a)}, B {list(b)}")
        ranks.add(a[0])
    if len(ranks) != 1:
        raise ValueError(f"--init_lora: {file} has layers of different ranks ({sorted(ranks)}); "
                         "fastcp's adapter slot has one rank")
    rank = ranks.pop()
    if rank < 1:
        raise ValueError(f"--init_lora: {file} has empty (rank 0) adapters")
    if rank > max_rank:
        raise ValueError(f"--init_lora: {file} has rank {rank} > --rank {max_rank}; pass --rank {rank} (or more)")
    return file


def validate_init_lora(args, backbone) -> None:
    """The CLI's check of ``--init_lora`` (no-op without one), before anything is written."""
    if getattr(args, "init_lora", None) is None:
        return
    if args.method == "fl2t" and getattr(args, "fl2t_set_size", 1) != 1:
        # fl2t restarts every slot of a set at each task of the set (order-agnostic learning), so
        # task 1's adapter would lose the file at task 2: refuse rather than ignore it silently
        raise ValueError(f"--init_lora: fl2t with --fl2t_set_size {args.fl2t_set_size} restarts task 1's adapter "
                         "at every task of its set; use --fl2t_set_size 1")
    check_init_lora(args.init_lora, backbone.unet, lora_target_names(args), args.rank)
