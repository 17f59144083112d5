"""An SD-1.5-shaped diffusers pipeline with random weights, saved with ``save_pretrained`` (no download).

The UNet is the SD 1.5 architecture at full size (block_out_channels (320, 640, 1280, 1280), cross-attention
dim 768, 64×64 latents = 512 px images) and so is the VAE; the text encoder is a CLIP text model of width
768 with fewer layers (its depth does not change what the GPU checks measure: the UNet dominates every
training step), over the small byte-level BPE tokenizer of ``fastcp.models.testing``. This is what
``benchmarks/gpu_suite.py --part train`` trains on; ``make_pipeline(path, tiny=True)`` gives the tiny
test fixture instead (``--cpu-smoke``).
"""
from __future__ import annotations

from pathlib import Path

import torch

SD15_UNET = dict(  # the SD 1.5 UNet architecture (config written out: no download)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512,
)


def make_pipeline(path, *, tiny: bool = False, seed: int = 0, text_layers: int = 2) -> Path:
    """Save an SD-1.5-shaped random-weight pipeline (or the tiny fixture when ``tiny``) to ``path``."""
    from fastcp.models import testing

    path = Path(path)
    if tiny:
        return testing.make_tiny_sd_pipeline(path, seed=seed)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = testing._tiny_clip_tokenizer()
    tokenizer.model_max_length = 77
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=text_layers,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
                                   text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def write_concepts(folder, *, num: int = 2, images: int = 4, size: int = 512, seed: int = 0) -> Path:
    """A task-sequence JSON of ``num`` concepts, each a folder of generated images (a coloured shape on a
    noisy background, one palette per concept). Returns the JSON path."""
    import json

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    entries = []
    for c in range(num):
        d = folder / f"concept{c}"
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 255, 3)
        for i in range(images):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            a, b = sorted(rng.integers(size // 8, size - size // 8, 2))
            img[a:b, a:b] = colour
            Image.fromarray(img).save(d / f"{i}.png")
        entries.append({"name": f"concept{c}", "class_word": "toy", "train_dir": d.name})
    out = folder / "concepts.json"
    out.write_text(json.dumps({"concepts": entries}, indent=1))
    return out
