"""Adapter files: fastcp's injected UNet and diffusers' load_lora_weights agree; round trips; errors."""
import pytest
import torch

from fastcp.models import load_backbone
from fastcp.models.lora_io import (
    load_concept_embeddings, load_lora_adapter, save_concept_embeddings, save_lora_adapter,
)
from fastcp.models.testing import make_tiny_sd_pipeline
from fastcp.nn import inject_multi_lora, lora_layers, lora_routing


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _randomize(unet, slot, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_a[slot].normal_(generator=g)
            layer.lora_b[slot].copy_(torch.randn(layer.lora_b[slot].shape, generator=g) * 0.1)


def _inputs(bb):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *bb.latent_shape, generator=g)
    return x, torch.tensor([5, 600]), bb.encode_prompt(["a photo of a dog", "a blue mug"]).encoder_hidden_states


def test_diffusers_load_lora_weights_matches_fastcp(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    bb = load_backbone(sd_dir)
    x, t, hidden = _inputs(bb)
    with torch.no_grad():
        base = bb.unet(x, t, encoder_hidden_states=hidden).sample
    inject_multi_lora(bb.unet, num_adapters=2, rank=4, alpha=2.0)  # alpha != rank: the scale is checked
    _randomize(bb.unet, 1, seed=3)
    with torch.no_grad(), lora_routing(bb.unet, adapter_ids=torch.tensor([1, 1])):
        ours = bb.unet(x, t, encoder_hidden_states=hidden).sample
    assert (ours - base).abs().max() > 1e-3
    save_lora_adapter(bb.unet, tmp_path / "adapter", slot=1)

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "adapter", weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=hidden).sample
    assert (theirs - base).abs().max() > 1e-3, "the adapter must change diffusers' output"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_round_trip_and_mismatch(sd_dir, tmp_path):
    bb = load_backbone(sd_dir)
    inject_multi_lora(bb.unet, num_adapters=1, rank=4, alpha=8.0)
    _randomize(bb.unet, 0, seed=5)
    save_lora_adapter(bb.unet, tmp_path / "a", slot=0, metadata={"note": "x"})
    other = load_backbone(sd_dir)
    inject_multi_lora(other.unet, num_adapters=3, rank=8)
    meta = load_lora_adapter(other.unet, tmp_path / "a", slot=2)
    assert meta["note"] == "x" and meta["fastcp_rank"] == "4"
    for name, layer in lora_layers(bb.unet).items():
        o = lora_layers(other.unet)[name]
        torch.testing.assert_close(o.delta_weight(2), layer.delta_weight(0), rtol=0, atol=0)
        assert int(o.ranks[2]) == 4 and float(o.scaling[2]) == 2.0
    small = load_backbone(sd_dir)
    inject_multi_lora(small.unet, num_adapters=1, rank=2)
    with pytest.raises(ValueError, match="does not match the model"):
        load_lora_adapter(small.unet, tmp_path / "a")
    kv_only = load_backbone(sd_dir)
    inject_multi_lora(kv_only.unet, num_adapters=1, rank=4, targets=("attn2.to_k",))
    with pytest.raises(ValueError, match="does not match the model"):
        load_lora_adapter(kv_only.unet, tmp_path / "a")


def test_concept_embeddings_load_in_diffusers(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    bb = load_backbone(sd_dir)
    tid = bb.add_concept_token("<v1>", generator=torch.Generator().manual_seed(0))
    vec = bb.text_encoder.get_input_embeddings().weight[tid].clone()
    save_concept_embeddings(bb, tmp_path / "emb", ["<v1>"])
    fresh = load_backbone(sd_dir)
    assert load_concept_embeddings(fresh, tmp_path / "emb") == ["<v1>"]
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[fresh.concept_tokens["<v1>"]], vec)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.load_textual_inversion(tmp_path / "emb" / "learned_embeds.safetensors")
    pid = pipe.tokenizer.convert_tokens_to_ids("<v1>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[pid], vec)


def test_partial_targets_wrap_only_those_modules_in_diffusers(sd_dir, tmp_path):
    """Adapters on attn2.to_k/to_v only: diffusers wraps exactly those modules and matches fastcp."""
    from diffusers import StableDiffusionPipeline

    bb = load_backbone(sd_dir)
    x, t, hidden = _inputs(bb)
    inject_multi_lora(bb.unet, num_adapters=1, rank=3, alpha=5.0, targets=("attn2.to_k", "attn2.to_v"))
    _randomize(bb.unet, 0, seed=7)
    with torch.no_grad(), lora_routing(bb.unet, adapter_ids=torch.tensor([0, 0])):
        ours = bb.unet(x, t, encoder_hidden_states=hidden).sample
    save_lora_adapter(bb.unet, tmp_path / "kv", slot=0)

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "kv")
    wrapped = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}
    assert len(wrapped) == 8 and wrapped == set(lora_layers(bb.unet))  # 4 transformer blocks x (to_k, to_v)
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_bad_file_or_slot_leaves_the_model_unchanged(sd_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bb = load_backbone(sd_dir)
    inject_multi_lora(bb.unet, num_adapters=2, rank=4)
    _randomize(bb.unet, 0, seed=9)
    save_lora_adapter(bb.unet, tmp_path / "a", slot=0)
    with pytest.raises(ValueError, match="slot"):
        load_lora_adapter(bb.unet, tmp_path / "a", slot=2)
    with pytest.raises(ValueError, match="slot"):
        save_lora_adapter(bb.unet, tmp_path / "b", slot=5)
    # corrupt the last layer's B only: the load must fail before slot 1 of any layer changes
    sd = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    last = sorted(k for k in sd if k.endswith("lora_B.weight"))[-1]
    sd[last] = sd[last][:-1]
    save_file(sd, tmp_path / "bad.safetensors")
    before = {n: (l.lora_a[1].clone(), l.lora_b[1].clone()) for n, l in lora_layers(bb.unet).items()}
    with pytest.raises(ValueError, match=r"does not match the model: layer .* file has A \[4, \d+\], B \[\d+, 4\]"):
        load_lora_adapter(bb.unet, tmp_path / "bad.safetensors", slot=1)
    for n, l in lora_layers(bb.unet).items():
        assert torch.equal(l.lora_a[1], before[n][0]) and torch.equal(l.lora_b[1], before[n][1])
    with pytest.raises(ValueError, match="does not exist"):
        load_lora_adapter(bb.unet, tmp_path / "nowhere")
