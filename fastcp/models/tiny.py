"""The embedded ``tiny`` backbone: a pixel-space 32x32 text-to-image model that trains on 2 CPU cores.

Components (all standard Hugging Face classes, saved in the diffusers directory layout under
``fastcp/models/tiny/`` so that ``load_backbone("tiny")`` takes the same path as a real pipeline):

- tokenizer: word-level (``tokenizers.models.WordLevel``) over the synthetic world's vocabulary,
  wrapped as a ``PreTrainedTokenizerFast``; concept placeholders (``<v1>``...) are added tokens.
- text encoder: a 2-layer ``CLIPTextModel`` (width 64).
- unet: ``UNet2DConditionModel`` (channels 32/64/64; "tiny v2"): full transformer blocks
  (self- and cross-attention) at 8x8 and in the middle block, and cross-attention only at 16x16
  (diffusers' per-block ``only_cross_attention``: the block's first attention attends to the text
  too). Why 16x16: C-LoRA trains only cross-attention K/V, and at 8x8 alone K/V cannot paint a
  concept's texture (tiny v1 learned fidelity 0.03 with it); why cross-only there: on two cores,
  self-attention over 256 tokens would cost more than the rest of the UNet together, while a
  cross-attention over the 10 prompt tokens costs little.
- scheduler: ``DDPMScheduler`` (1000 steps, squared-cosine betas, epsilon prediction).
"""
from __future__ import annotations

import torch

MAX_PROMPT_TOKENS = 10
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=MAX_PROMPT_TOKENS,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_PROMPT_TOKENS, projection_dim=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(cfg)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # per down block (32x32, 16x16, 8x8); the up blocks take it reversed: 16x16 is cross-only
        only_cross_attention=(False, True, False),
        cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True)


def build_tiny_backbone(seed: int = 0):
    """A randomly initialised tiny Backbone (what ``pretrain_tiny`` starts from)."""
    from fastcp.data.synthetic import vocabulary
    from fastcp.models.backbone import Backbone

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary())
    return Backbone(name="tiny", unet=build_unet(), text_encoder=build_text_encoder(tokenizer),
                    tokenizer=tokenizer, scheduler=build_scheduler(), vae=None)
