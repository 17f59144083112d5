"""SDXL directories (two text encoders, pooled embeddings, added time ids) through the same code paths."""
import json
import subprocess
import sys

import pytest
import torch

from fastcp.data.concepts import export_embedded_sequence
from fastcp.dc import DiffusionClassifier, errors_loop
from fastcp.models import load_backbone
from fastcp.models.lora_io import load_concept_embeddings, save_concept_embeddings
from fastcp.models.testing import make_tiny_sdxl_pipeline
from fastcp.nn import inject_multi_lora, lora_layers


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def test_sdxl_loads_encodes_and_round_trips(sdxl_dir, tmp_path):
    bb = load_backbone(sdxl_dir)
    assert bb.is_sdxl and bb.sample_size == 32
    cond = bb.encode_prompt(["a photo of a dog", "a red star", ""])
    assert cond.encoder_hidden_states.shape == (3, 16, 64)  # 32 + 32 channels of both encoders
    assert cond.added_cond_kwargs["text_embeds"].shape == (3, 32)
    assert cond.added_cond_kwargs["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
    tid = bb.add_concept_token("<v1>", init_word="dog")
    assert len(set(bb.concept_token_ids("<v1>"))) == 1 and tid in bb.tokenize(["a <v1> dog"], bb.tokenizer_2)[0]
    x = torch.randn(3, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = bb.unet(x, torch.tensor([1, 300, 900]), **cond.unet_kwargs()).sample
    bb.save_pretrained(tmp_path / "copy")
    again = load_backbone(tmp_path / "copy")
    with torch.no_grad():
        got = again.unet(x, torch.tensor([1, 300, 900]), **again.encode_prompt(["a photo of a dog", "a red star", ""]).unet_kwargs()).sample
    torch.testing.assert_close(got, ref)
    save_concept_embeddings(bb, tmp_path / "emb", ["<v1>"])
    fresh = load_backbone(sdxl_dir)
    assert load_concept_embeddings(fresh, tmp_path / "emb") == ["<v1>"]
    for (_, e1), (_, e2) in zip(bb.text_pairs(), fresh.text_pairs()):
        i = bb.concept_token_ids("<v1>")[0]
        assert torch.equal(e1.get_input_embeddings().weight[i], e2.get_input_embeddings().weight[i])


def test_sdxl_dc_engine_equals_loop(sdxl_dir):
    bb = load_backbone(sdxl_dir)
    inject_multi_lora(bb.unet, num_adapters=2, rank=2)
    with torch.no_grad():
        for layer in lora_layers(bb.unet).values():
            layer.lora_b.normal_(generator=torch.Generator().manual_seed(1)).mul_(0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *bb.latent_shape, generator=g)
    cond = bb.encode_prompt(["a photo of a dog", "a red star", "a blue mug"])
    ts, noise = torch.tensor([100, 700]), torch.randn(2, *bb.latent_shape, generator=g)
    ids = torch.tensor([0, -1, 1])
    with torch.no_grad():
        ref = errors_loop(bb.unet, bb.scheduler, x, cond, ts, noise, ids)
        got = DiffusionClassifier(bb.unet, bb.scheduler).errors(x, cond, ts, noise, ids, batch_size=5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_sdxl_training_run_and_diffusers_loads_the_adapter(sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    seq = export_embedded_sequence(tmp_path / "data", num_concepts=2)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-P", "-m", "fastcp.train", "--output_dir", str(out),
                           "--pretrained_model_name_or_path", str(sdxl_dir), "--concepts", str(seq),
                           "--max_train_steps", "2", "--train_batch_size", "2", "--num_eval_images", "1",
                           "--eval_inference_steps", "2", "--dc_timesteps", "2", "--dc_eval_images", "1",
                           "--learning_rate", "0.05"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"holdout_loss", "dc_acc"} and results["backbone"] == str(sdxl_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    bb = load_backbone(sdxl_dir)
    cond = bb.encode_prompt(["a photo of a dog"])
    x = torch.randn(1, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = pipe.unet(x, torch.tensor([500]), **cond.unet_kwargs()).sample
        pipe.load_lora_weights(str(out / "task_02_striped_heart"), weight_name="pytorch_lora_weights.safetensors")
        tuned = pipe.unet(x, torch.tensor([500]), **cond.unet_kwargs()).sample
    assert (tuned - base).abs().max() > 0
