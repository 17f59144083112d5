"""load_backbone: the embedded tiny model and SD-style diffusers directories, save/load round trips."""
import shutil

import pytest
import torch

from fastcp.models import load_backbone
from fastcp.models.testing import make_tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _unet_out(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *bb.latent_shape, generator=g)
    cond = bb.encode_prompt(["a photo of a dog", "a red star"])
    with torch.no_grad():
        return bb.unet(x, torch.tensor([10, 700]), **cond.unet_kwargs()).sample


def test_tiny_loads_and_round_trips(tmp_path):
    bb = load_backbone("tiny")
    assert bb.name == "tiny" and bb.vae is None and bb.sample_size == 32
    assert bb.prediction_type == "epsilon" and bb.latent_shape == (3, 32, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(bb.encode_images(x), x)  # pixel space: identity
    ref = _unet_out(bb)
    bb.save_pretrained(tmp_path / "tiny_copy")
    again = load_backbone(tmp_path / "tiny_copy")
    assert torch.equal(_unet_out(again), ref)


def test_sd_directory_loads_through_the_same_call(sd_dir, tmp_path):
    bb = load_backbone(sd_dir)
    assert bb.vae is not None and bb.sample_size == 32 and bb.latent_shape == (4, 16, 16)
    z = bb.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert z.shape == (2, 4, 16, 16) and bb.decode_latents(z).shape == (2, 3, 32, 32)
    cond = bb.encode_prompt(["a photo of a dog"])
    assert cond.encoder_hidden_states.shape == (1, 16, 32)
    imgs = bb.generate(["a red dog"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (1, 3, 32, 32) and imgs.abs().max() <= 1
    ref = _unet_out(bb)
    bb.save_pretrained(tmp_path / "copy")
    assert torch.equal(_unet_out(load_backbone(tmp_path / "copy")), ref)


def test_add_concept_token(sd_dir):
    bb = load_backbone(sd_dir)
    n_before = len(bb.tokenizer)
    tid = bb.add_concept_token("<v1>", init_word="dog")
    assert tid == n_before and bb.add_concept_token("<v1>") == tid
    ids = bb.tokenizer("a photo of <v1> dog").input_ids
    assert tid in ids
    table = bb.text_encoder.get_input_embeddings().weight
    dog = bb.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(table[tid], table[dog])
    rid = bb.add_concept_token("<v2>", generator=torch.Generator().manual_seed(0))
    assert rid == n_before + 1 and bb.text_encoder.get_input_embeddings().weight.shape[0] == n_before + 2
    assert bb.text_encoder.get_input_embeddings().weight[rid].norm() > 0
    with pytest.raises(ValueError, match="already a word"):
        bb.add_concept_token("dog</w>" if "dog</w>" in bb.tokenizer.get_vocab() else "dog")


def test_v_prediction_directory(tmp_path):
    bb = load_backbone(make_tiny_sd_pipeline(tmp_path / "v", prediction_type="v_prediction"))
    assert bb.prediction_type == "v_prediction"


def test_missing_components_are_one_line_errors(sd_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ValueError, match=r"lacks the component folder\(s\) unet"):
        load_backbone(broken)
    with pytest.raises(ValueError, match="neither 'tiny' nor an existing directory"):
        load_backbone(tmp_path / "nothing")
