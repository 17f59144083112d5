"""Tiny random-weight Stable Diffusion pipelines for tests (no download).

``make_tiny_sd_pipeline(path)`` builds an SD 1.x-layout ``StableDiffusionPipeline`` from small
configs (UNet, VAE, CLIP text encoder, a real ``CLIPTokenizer`` from a hand-written BPE vocab)
and saves it with ``save_pretrained``: the directory users' real checkpoints have, so tests go
through the same ``load_backbone`` path.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_WORDS = ["a", "photo", "of", "dog", "cat", "red", "blue", "star", "mug", "the", "toy", "in", "on"]


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2/CLIP) uses for the bytes 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a tiny byte-level BPE that knows a few whole words."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = _byte_level_alphabet()
    vocab_tokens = ["<|startoftext|>", "<|endoftext|>"] + byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    for w in _WORDS:
        # merge left to right: ((a b) c)... then the final piece with </w>
        cur = w[0]
        for ch in w[1:-1]:
            merges.append(f"{cur} {ch}")
            cur += ch
            vocab_tokens.append(cur)
        if len(w) > 1:
            merges.append(f"{cur} {w[-1]}</w>")
            vocab_tokens.append(w + "</w>")
    seen, ordered = set(), []
    for t in vocab_tokens:
        if t not in seen:
            seen.add(t)
            ordered.append(t)
    vocab = {t: i for i, t in enumerate(ordered)}
    merges = list(dict.fromkeys(merges))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def _tiny_clip_tokenizer():
    """A real CLIPTokenizer over the hand-written vocabulary (its files only live while it loads)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = _write_clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=16)


def _tiny_vae(sample_size: int):
    """A 4-channel AutoencoderKL with one downsampling: images of 2·sample_size pixels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=16, sample_size=2 * sample_size,
    )


def make_tiny_sd_pipeline(path, *, prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 16):
    """Build and save a tiny random-weight SD 1.x-style pipeline; returns ``Path(path)``.

    UNet: 2 levels (32, 64 channels), cross-attention dim 32, ``sample_size`` latents of 4
    channels; VAE with one downsampling (images are 2·sample_size pixels); CLIP text encoder of
    width 32; DDPM-compatible scheduler with ``prediction_type`` (``epsilon`` or ``v_prediction``).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = _tiny_vae(sample_size)
    tokenizer = _tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type, clip_sample=False, steps_offset=1,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl_pipeline(path, *, seed: int = 0, sample_size: int = 16):
    """Build and save a tiny random-weight SDXL pipeline (two CLIP text encoders, the second with
    a projection; UNet with ``text_time`` added conditions); returns ``Path(path)``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
        norm_num_groups=16, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
    )
    vae = _tiny_vae(sample_size)
    tokenizer, tokenizer_2 = _tiny_clip_tokenizer(), _tiny_clip_tokenizer()

    def text_config(width):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                              projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(32))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)
    pipe.save_pretrained(path)
    return path


def random_lora_unet(num_adapters: int = 3, rank: int = 4, seed: int = 0, lora_std: float = 0.1):
    """The tiny UNet (random weights) with ``num_adapters`` LoRA slots in every attention projection
    and random B (std ``lora_std``), so every adapter changes the output: the fixture of the op-level
    UNet tests (sync counter, compile, GPU hot path)."""
    import torch

    from fastcp.models.tiny import build_unet
    from fastcp.nn import ATTENTION_TARGETS, inject_multi_lora

    torch.manual_seed(seed)
    unet = build_unet()
    layers = inject_multi_lora(unet, num_adapters=num_adapters, rank=rank, targets=ATTENTION_TARGETS)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_b.normal_(std=lora_std)
    return unet


def make_tiny_clip_model(path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A random-weight transformers ``CLIPModel`` + tokenizer + image processor saved with
    ``save_pretrained`` (what ``--clip_model`` loads), small enough for CPU tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(str(path))
    return path


def make_tiny_dino_model(path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A random-weight transformers ``ViTModel`` (DINO's architecture) + image processor, saved
    with ``save_pretrained`` (what ``--dino_model`` loads)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=image_size, patch_size=8)
    ViTModel(cfg).save_pretrained(str(path))
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(str(path))
    return path
