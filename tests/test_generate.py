"""``fastcp.generate``: images from RUN/model/, mixed concepts routed per sample in one batched pass."""
import json

import pytest
import torch

from fastcp import generate
from fastcp.continual import ContinualTrainer
from fastcp.data.concepts import embedded_sequence
from fastcp.models import load_backbone
from fastcp.models.export import read_index
from fastcp.models.lora_io import load_concept_embeddings, read_lora_file
from fastcp.models.testing import make_tiny_sd_pipeline
from fastcp.train import make_args

QUICK = dict(max_train_steps=2, train_batch_size=2, num_eval_images=1, eval_inference_steps=1, dc_timesteps=1,
             dc_eval_images=1, learning_rate=0.05, token_learning_rate=0.05)
SAMPLING = dict(num_images=2, seed=3, guidance_scale=3.0, num_inference_steps=2)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def train(base, out, method):
    args = make_args(output_dir=out, method=method, pretrained_model_name_or_path=str(base), **QUICK)
    trainer = ContinualTrainer(args, load_backbone(base), embedded_sequence(2), log=lambda *a, **k: None)
    trainer.run()
    trainer.bb.unet.eval()
    return trainer


@pytest.fixture(scope="module")
def fl2t_run(sd_dir, tmp_path_factory):
    return train(sd_dir, tmp_path_factory.mktemp("fl2t") / "run", "fl2t")


def folded(base, run, adapter=None) -> generate.PersonalizedModel:
    """An independent reference: the base model, the tokens, and one concept's adapter folded into
    the weights (no routing at all); ``adapter=None``: the base model alone."""
    folder, index = read_index(run)
    bb = load_backbone(base)
    for c in index["concepts"]:
        load_concept_embeddings(bb, folder / c["embeddings"])
    if adapter is not None:
        factors, scales, _ = read_lora_file(folder / adapter)
        generate._fold_into_weights(bb.unet, factors, scales, folder)
    return generate.PersonalizedModel(bb, index, folder, single=True)


def test_mixed_batch_equals_per_concept_generation(sd_dir, fl2t_run):
    model = generate.load_model(fl2t_run.out, device="cpu")
    assert not model.single and model.slots == {"<v1>": 0, "<v2>": 1}
    c = [x.prompt for x in fl2t_run.concepts]
    prompts = [c[1], "a photo of a dog", c[0], c[1]]  # mixed, unsorted, one prompt without a token
    assert model.adapter_ids(prompts).tolist() == [1, -1, 0, 1]
    mixed = model.generate(prompts, **SAMPLING, batch_size=8)  # every sample in one routed pass
    assert mixed.shape == (8, 3, 32, 32)
    index = model.index
    refs = {None: folded(sd_dir, fl2t_run.out)}
    for k, con in enumerate(index["concepts"]):
        refs[con["token"]] = folded(sd_dir, fl2t_run.out, con["adapter"])
    for p, prompt in enumerate(prompts):
        token = next((t for t in refs if t and t in prompt), None)
        want = refs[token].generate([prompt], **SAMPLING)
        torch.testing.assert_close(mixed[2 * p: 2 * p + 2], want, rtol=1e-5, atol=1e-5)
    # and fastcp's own model at the end of training (the method's routing, the same initial noise)
    noise = torch.stack([torch.randn(model.backbone.latent_shape, generator=torch.Generator().manual_seed(3 + k))
                         for k in range(2)])
    with torch.no_grad(), fl2t_run.method.generation_routing(0):
        own = fl2t_run.bb.generate([c[0]] * 2, 2, 3.0, latents=noise)
    torch.testing.assert_close(mixed[4:6], own, rtol=1e-4, atol=1e-5)
    assert (mixed[0:2] - mixed[6:8]).abs().max() == 0 and (mixed[4:6] - mixed[6:8]).abs().max() > 1e-3
    # batches of 3 cut the mixed batch differently: same images
    torch.testing.assert_close(model.generate(prompts, **SAMPLING, batch_size=3), mixed, rtol=1e-5, atol=1e-5)


def test_single_model_generates_like_the_trained_model(sd_dir, tmp_path):
    trainer = train(sd_dir, tmp_path / "run", "naive")
    model = generate.load_model(trainer.out / "model", device="cpu")
    assert model.single and model.adapter_ids(["a <v1> and a <v2>"]).tolist() == [-1]
    prompt = trainer.concepts[1].prompt
    got = model.generate([prompt], **SAMPLING)
    noise = torch.stack([torch.randn(model.backbone.latent_shape, generator=torch.Generator().manual_seed(3 + k))
                         for k in range(2)])
    with torch.no_grad():
        own = trainer.bb.generate([prompt] * 2, 2, 3.0, latents=noise)
    torch.testing.assert_close(got, own, rtol=1e-4, atol=1e-5)


def test_cli_writes_pngs_grid_and_index(fl2t_run, tmp_path):
    from PIL import Image

    pf = tmp_path / "prompts.txt"
    pf.write_text(f"# a comment\n{fl2t_run.concepts[1].prompt}\n\na photo of a dog\n")
    out = tmp_path / "samples"
    rc = generate.main(["--run", str(fl2t_run.out), "--prompt", fl2t_run.concepts[0].prompt, "--prompt_file", str(pf),
                        "--num_images", "2", "--num_inference_steps", "2", "--output_dir", str(out), "--device", "cpu"])
    assert rc == 0
    meta = json.loads((out / "images.json").read_text())
    names = [m["file"] for m in meta["images"]]
    assert names[:2] == ["000_a-photo-of-v1-star_00.png", "000_a-photo-of-v1-star_01.png"] and len(names) == 6
    assert [m["concept_token"] for m in meta["images"]] == ["<v1>", "<v1>", "<v2>", "<v2>", None, None]
    assert [m["seed"] for m in meta["images"]] == [0, 1] * 3
    for n in names:
        assert Image.open(out / n).size == (32, 32)
    assert Image.open(out / "grid.png").size[1] >= 3 * 32


@pytest.mark.parametrize("case", ["missing_run", "no_model", "prompt_file", "unknown_token", "two_concepts"])
def test_bad_input_is_one_line_and_exit_2(fl2t_run, tmp_path, capsys, case):
    run, prompt = str(fl2t_run.out), ["--prompt", "a photo of <v1> star"]
    argv = {"missing_run": ["--run", str(tmp_path / "nowhere"), *prompt],
            "no_model": ["--run", str(tmp_path), *prompt],
            "prompt_file": ["--run", run, "--prompt_file", str(tmp_path / "missing.txt")],
            "unknown_token": ["--run", run, "--prompt", "a photo of <v9> star"],
            "two_concepts": ["--run", run, "--prompt", "<v1> next to <v2>"]}[case]
    rc = generate.main([*argv, "--output_dir", str(tmp_path / "o"), "--num_inference_steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fastcp.generate: error: "), err
    assert {"missing_run": "does not exist", "no_model": "no exported model", "prompt_file": "missing.txt",
            "unknown_token": "<v9>", "two_concepts": "names 2 concepts"}[case] in err[0]
    assert not (tmp_path / "o").exists()
