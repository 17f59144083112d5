"""RUN/model/: the personalized model after every task as diffusers loads it.

For every method, a 2-task run on tiny random SD / SDXL pipelines (2 steps per task, a large
learning rate so the deltas are far from zero), then the real diffusers ``load_lora_weights`` +
``load_textual_inversion`` must reproduce fastcp's own final UNet output to 1e-5 on the prompt of
a concept (prompt embeddings from the loaded pipeline's text encoders), and the exported LoRA must
be exactly W − W0 (plus the live adapter) per layer.
"""
import json

import pytest
import torch

from fastcp.continual import ContinualTrainer
from fastcp.data.concepts import embedded_sequence
from fastcp.models import load_backbone
from fastcp.models.export import MODEL_DIR, dense_lora, read_index, truncate_lora
from fastcp.models.lora_io import read_lora_file
from fastcp.models.testing import make_tiny_sd_pipeline, make_tiny_sdxl_pipeline
from fastcp.nn import lora_layers
from fastcp.train import make_args

SINGLE = ["naive", "merge", "ortho", "magmax", "clora", "ewc_dc", "dsc", "joint"]
QUICK = dict(max_train_steps=2, train_batch_size=2, num_eval_images=1, eval_inference_steps=1, dc_timesteps=1,
             dc_eval_images=1, learning_rate=0.05, token_learning_rate=0.05, dc_images=1, fisher_images=1,
             fisher_timesteps=1)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def train(base_dir, out, method, num_concepts=2, **extra) -> ContinualTrainer:
    args = make_args(output_dir=out, method=method, pretrained_model_name_or_path=str(base_dir), **{**QUICK, **extra})
    trainer = ContinualTrainer(args, load_backbone(base_dir), embedded_sequence(num_concepts), log=lambda *a, **k: None)
    trainer.run()
    trainer.bb.unet.eval()
    return trainer


def unet_inputs(model):
    """Fixed latents [2, C, h, w] and timesteps for a Backbone or a diffusers pipeline."""
    c = model.unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([500, 80])


@torch.no_grad()
def fastcp_output(trainer, j):
    bb, x, t = trainer.bb, *unet_inputs(trainer.bb)
    with trainer.method.generation_routing(j):
        return bb.unet(x, t, **bb.encode_prompt([trainer.concepts[j].prompt] * 2).unet_kwargs()).sample


def diffusers_pipeline(base_dir, model_dir, index):
    """The base pipeline with the exported concept tokens loaded the way the model card says."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    if index["is_sdxl"]:
        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
        for c in index["concepts"]:
            emb = load_file(model_dir / c["embeddings"])
            pipe.load_textual_inversion(emb["clip_l"], token=c["token"], text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(emb["clip_g"], token=c["token"], text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
        for c in index["concepts"]:
            pipe.load_textual_inversion(model_dir / c["embeddings"])
    return pipe


@torch.no_grad()
def diffusers_output(pipe, prompt, is_sdxl):
    x, t = unet_inputs(pipe)
    if is_sdxl:
        emb, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=2,
                                               do_classifier_free_guidance=False)
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=emb.dtype)
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    else:
        emb, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=2, do_classifier_free_guidance=False)
        kw = {}
    return pipe.unet(x, t, encoder_hidden_states=emb, **kw).sample


def check_exact_delta(trainer, base_dir, factors):
    """The exported LoRA is W − W0 + the live single-model adapter, per layer."""
    w0 = {n: m.weight for n, m in load_backbone(base_dir).unet.named_modules() if n in factors}
    changed = 0
    for name, layer in lora_layers(trainer.bb.unet).items():
        a, b = factors[name]
        live = layer.delta_weight(0) if trainer.method.export_form == "carried" else 0
        want = layer.base.weight.detach().float() - w0[name].float() + live
        torch.testing.assert_close(b @ a, want, rtol=0, atol=2e-6)
        changed += bool(want.abs().max() > 1e-4)
    assert changed > 0, "no layer changed: the test would pass trivially"


def check_against_diffusers(trainer, base_dir, method):
    model_dir, index = read_index(trainer.out)
    assert model_dir == trainer.out / MODEL_DIR and index["method"] == method and index["tasks"] == 2
    assert [c["name"] for c in index["concepts"]] == [c.name for c in trainer.concepts]
    assert (model_dir / "model_card.md").read_text().count("load_textual_inversion") >= 2
    pipe = diffusers_pipeline(base_dir, model_dir, index)
    prompt = trainer.concepts[0].prompt  # the earlier concept: the model must still carry it
    base = diffusers_output(pipe, prompt, index["is_sdxl"])
    pipe.load_lora_weights(model_dir)
    theirs = diffusers_output(pipe, prompt, index["is_sdxl"])
    ours = fastcp_output(trainer, 0)
    assert (theirs - base).abs().max() > 1e-3, "the exported LoRA must change diffusers' output"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    return model_dir, index


@pytest.mark.parametrize("method", SINGLE)
def test_single_model_loads_in_diffusers_and_is_exact(sd_dir, tmp_path, method):
    trainer = train(sd_dir, tmp_path / "run", method)
    model_dir, index = check_against_diffusers(trainer, sd_dir, method)
    assert index["single_model"] and index["form"] == trainer.method.export_form
    factors, scales, meta = read_lora_file(model_dir)
    assert set(scales.values()) == {1.0} and meta["fastcp_method"] == method
    check_exact_delta(trainer, sd_dir, factors)
    r = trainer.args.rank
    ranks = {a.shape[0] for a, _ in factors.values()}
    if index["form"] == "merged":  # one LoRA of rank Σ r_n
        assert ranks == {2 * r}
    elif index["form"] in ("carried", "terms"):  # terms (ortho paper): s·B_cum A_cum, rank r
        assert ranks == {r}
    else:  # dense: full rank min(out, in) per layer, through peft's rank_pattern
        assert ranks == {min(b.shape[0], a.shape[1]) for a, b in factors.values()} and len(ranks) > 1


@pytest.mark.parametrize("method", ["merge", "magmax"])
def test_sdxl_model_loads_in_diffusers(sdxl_dir, tmp_path, method):
    trainer = train(sdxl_dir, tmp_path / "run", method)
    model_dir, index = check_against_diffusers(trainer, sdxl_dir, method)
    assert index["is_sdxl"] and index["pipeline"] == "StableDiffusionXLPipeline"
    check_exact_delta(trainer, sdxl_dir, read_lora_file(model_dir)[0])


@pytest.mark.parametrize("method", ["separate", "fl2t"])
def test_per_concept_adapters_load_in_diffusers(sd_dir, tmp_path, method):
    trainer = train(sd_dir, tmp_path / "run", method)
    model_dir, index = read_index(trainer.out)
    assert not index["single_model"] and not (model_dir / "pytorch_lora_weights.safetensors").exists()
    pipe = diffusers_pipeline(sd_dir, model_dir, index)
    for c in index["concepts"]:
        pipe.load_lora_weights(model_dir / "adapters" / c["name"], adapter_name=c["name"])
    outs = []
    for j, c in enumerate(index["concepts"]):
        pipe.set_adapters(c["name"])
        theirs = diffusers_output(pipe, c["prompt"], False)
        torch.testing.assert_close(theirs, fastcp_output(trainer, j), rtol=1e-5, atol=1e-5)
        outs.append(theirs)
        ranks = {a.shape[0] for a, _ in read_lora_file(model_dir / c["adapter"])[0].values()}
        # separate: the concept's slot alone; fl2t: every learned slot, gated (rank 2r after 2 tasks)
        assert ranks == {trainer.args.rank * (1 if method == "separate" else 2)}
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_export_rank_truncation_and_errors(sd_dir, tmp_path):
    trainer = train(sd_dir, tmp_path / "run", "magmax", export_rank=3)
    model_dir, index = read_index(trainer.out)
    exact, _, _ = read_lora_file(model_dir)
    low, scales, _ = read_lora_file(model_dir / "rank_3")
    errors = json.loads((model_dir / "rank_3" / "svd_error.json").read_text())
    assert index["truncated"]["rank"] == 3 and index["truncated"]["relative_error"] == errors["relative_error"]
    assert set(scales.values()) == {1.0} and {a.shape[0] for a, _ in low.values()} == {3}
    lost = total = 0.0
    for name, (a, b) in exact.items():
        d, d3 = b @ a, low[name][1] @ low[name][0]
        e = float((d - d3).norm() / d.norm()) if d.norm() > 0 else 0.0
        assert abs(e - errors["layers"][name]["relative_error"]) < 1e-4
        lost, total = lost + float((d - d3).norm() ** 2), total + float(d.norm() ** 2)
    assert abs((lost / total) ** 0.5 - errors["relative_error"]) < 1e-4
    assert 0 < errors["relative_error"] < 1  # magmax's delta is not of rank 3


def test_export_rank_is_refused_for_per_concept_methods(tmp_path, capsys):
    from fastcp import train as cli

    assert cli.main(["--output_dir", str(tmp_path / "o"), "--method", "fl2t", "--export_rank", "4"]) == 2
    assert "--export_rank applies to methods with one model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_truncate_is_exact_at_full_rank_and_optimal():
    g = torch.Generator().manual_seed(0)
    low = {"a": (torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g))}  # rank 4 < min(9, 12)
    cut, err = truncate_lora(low, 4)
    torch.testing.assert_close(cut["a"][1] @ cut["a"][0], low["a"][1] @ low["a"][0], rtol=1e-5, atol=1e-5)
    assert err["relative_error"] < 1e-6
    d = torch.randn(7, 5, generator=g)
    cut, err = truncate_lora(dense_lora({"d": d}), 2)
    s = torch.linalg.svdvals(d)
    assert abs(err["relative_error"] - float(s[2:].norm() / s.norm())) < 1e-5
    assert abs(float((d - cut["d"][1] @ cut["d"][0]).norm() / d.norm()) - err["relative_error"]) < 1e-5
    a, b = dense_lora({"d": d})["d"]
    assert torch.equal(b @ a, d)  # a product with the identity adds only zeros


def test_model_folder_is_replaced_atomically(sd_dir, tmp_path):
    from fastcp.files import atomic_dir

    trainer = train(sd_dir, tmp_path / "run", "merge")
    before = {p.relative_to(trainer.out): p.read_bytes() for p in (trainer.out / MODEL_DIR).rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError):
        with atomic_dir(trainer.out / MODEL_DIR) as tmp:
            (tmp / "pytorch_lora_weights.safetensors").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    after = {p.relative_to(trainer.out): p.read_bytes() for p in (trainer.out / MODEL_DIR).rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in trainer.out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("method", ["merge", "separate"])
def test_model_card_code_runs(sd_dir, tmp_path, method):
    """The diffusers code of model_card.md, run as written, loads the model and generates."""
    trainer = train(sd_dir, tmp_path / "run", method, max_train_steps=1)
    card = (trainer.out / MODEL_DIR / "model_card.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert str((trainer.out / MODEL_DIR).resolve()) in code
    scope = {}
    exec(compile(code.replace('pipe("', 'pipe(num_inference_steps=2, prompt="'), "model_card.md", "exec"), scope)
    assert scope["image"].size == (32, 32)
    if method == "separate":
        assert scope["pipe"].get_active_adapters() == [trainer.concepts[0].name]


@pytest.mark.parametrize("method", ["merge", "fl2t"])
def test_extended_run_exports_the_model_of_one_longer_run(sd_dir, tmp_path, method):
    """--extend_run adds a concept to a finished run: model/ then equals the longer run's (the merged
    factors of the earlier tasks come from their per-task files, which stay in the run)."""
    from safetensors.torch import load_file

    one = train(sd_dir, tmp_path / "one", method, num_concepts=3)
    train(sd_dir, tmp_path / "ext", method, num_concepts=2)
    ext = train(sd_dir, tmp_path / "ext", method, num_concepts=3, extend_run=True)
    (a_dir, a), (b_dir, b) = read_index(one.out), read_index(ext.out)
    assert a["tasks"] == b["tasks"] == 3 and [c["name"] for c in a["concepts"]] == [c["name"] for c in b["concepts"]]
    files = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b_dir) for p in b_dir.rglob("*.safetensors")) and len(files) >= 4
    for f in files:
        x, y = load_file(a_dir / f), load_file(b_dir / f)
        assert x.keys() == y.keys(), f
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6, msg=f"{f}: {k}")
    if method == "merge":
        assert {t.shape[0] for k, t in load_file(b_dir / "pytorch_lora_weights.safetensors").items()
                if k.endswith("lora_A.weight")} == {3 * ext.args.rank}
