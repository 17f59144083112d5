"""CLIP-I, CLIP-T and DINO from local directories (tiny random models built with save_pretrained),
evaluation prompts, and the evaluator's per-concept draws."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastcp.eval.features import ClipScorer, DinoScorer, cosine_mean
from fastcp.eval.prompts import CONTEXTUAL_PROMPTS, EvalPromptsError, concept_eval_prompts, load_eval_prompts
from fastcp.models.testing import make_tiny_clip_model, make_tiny_dino_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("feature_models")
    return make_tiny_clip_model(d / "clip"), make_tiny_dino_model(d / "dino")


def _images(n=3, seed=0):
    """Images [n, 3, 32, 32] in [-1, 1] that are exact uint8 values (what PIL hands a processor)."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return u8.float() / 255 * 2 - 1, [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in u8]


def test_features_equal_plain_transformers(models):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    clip_dir, dino_dir = models
    x, pil = _images()
    clip = ClipScorer(clip_dir)
    ref_model, proc, tok = CLIPModel.from_pretrained(clip_dir), AutoImageProcessor.from_pretrained(clip_dir), \
        AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        ref_img = ref_model.get_image_features(**proc(images=pil, return_tensors="pt"))
        t = tok(["a photo of a dog", "a cat"], padding=True, return_tensors="pt")
        ref_txt = ref_model.get_text_features(**t)
    ref_img, ref_txt = (getattr(r, "pooler_output", r) for r in (ref_img, ref_txt))
    torch.testing.assert_close(clip.images(x), ref_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clip.texts(["a photo of a dog", "a cat"]), ref_txt, rtol=1e-4, atol=1e-5)

    dino = DinoScorer(dino_dir)
    ref = AutoModel.from_pretrained(dino_dir)
    with torch.no_grad():
        cls = ref(**AutoImageProcessor.from_pretrained(dino_dir)(images=pil, return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.images(x), cls, rtol=1e-4, atol=1e-5)


def test_cosine_mean_hand_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert cosine_mean(a[:1], a[:1]) == pytest.approx(1.0)
    assert cosine_mean(a[:1], a[1:]) == pytest.approx(0.0)
    assert cosine_mean(a, a) == pytest.approx(0.5)  # mean of [[1, 0], [0, 1]]


def test_eval_prompts(tmp_path):
    from fastcp.data.concepts import Concept

    c = Concept(name="rex", token="<v1>", prompt="a photo of <v1> dog", class_word="dog", train_images=torch.zeros(1, 3, 8, 8))
    with_token, plain = concept_eval_prompts(c, ("a {} on the beach", "a {} in the snow"), 3)
    assert with_token == ["a <v1> dog on the beach", "a <v1> dog on the beach", "a <v1> dog in the snow"]
    assert plain == ["a dog on the beach", "a dog on the beach", "a dog in the snow"]
    assert concept_eval_prompts(c, None, 2) == (["a photo of <v1> dog"] * 2, ["a photo of dog"] * 2)
    assert all(t.count("{}") == 1 for t in CONTEXTUAL_PROMPTS)
    f = tmp_path / "p.txt"
    f.write_text("# contexts\na {} on a boat\n\n  a {} in space  \n")
    assert load_eval_prompts(f) == ("a {} on a boat", "a {} in space")
    f.write_text("a boat\n")
    with pytest.raises(EvalPromptsError, match="must contain"):
        load_eval_prompts(f)
    with pytest.raises(EvalPromptsError, match="cannot be read"):
        load_eval_prompts(tmp_path / "missing.txt")


def test_eval_prompts_spread_other_braces_and_concepts_without_class_word(tmp_path):
    from fastcp.data.concepts import Concept

    c = Concept(name="rex", token="<v1>", prompt="a photo of <v1> dog", class_word="dog", train_images=torch.zeros(1, 3, 8, 8))
    templates = tuple(f"t{k} {{}}" for k in range(16))
    # 4 images over 16 templates: spread over the list, not the first 4
    assert concept_eval_prompts(c, templates, 4)[0] == [f"t{k} <v1> dog" for k in (0, 4, 8, 12)]
    assert concept_eval_prompts(c, templates[:2], 5)[0] == ["t0 <v1> dog"] * 3 + ["t1 <v1> dog"] * 2
    # a template with other braces is accepted by the file check, so it must also fill in
    f = tmp_path / "p.txt"
    f.write_text("a {} in {curly} braces\n")
    assert concept_eval_prompts(c, load_eval_prompts(f), 1) == (["a <v1> dog in {curly} braces"],
                                                                ["a dog in {curly} braces"])
    # --instance_data_dir / --concepts_dir concepts have no class word: the word after the token
    bare = Concept(name="rex", token="<v1>", prompt="a photo of <v1> dog", train_images=torch.zeros(1, 3, 8, 8))
    assert concept_eval_prompts(bare, ("a {} on the beach",), 1) == (["a <v1> dog on the beach"], ["a dog on the beach"])
    alone = Concept(name="rex", token="<v1>", prompt="a photo of <v1>", train_images=torch.zeros(1, 3, 8, 8))
    assert concept_eval_prompts(alone, ("a {} on the beach",), 1) == (["a <v1> on the beach"], ["a object on the beach"])


def test_evaluator_draws_do_not_depend_on_the_sequence_length():
    from fastcp.data.concepts import embedded_sequence
    from fastcp.eval.metrics import ContinualEvaluator
    from fastcp.methods import get_method
    from fastcp.models import load_backbone
    from fastcp.train import make_args

    bb = load_backbone("tiny")
    method = get_method("naive")(make_args(method="naive"))
    rows = []
    for T in (2, 3):
        ev = ContinualEvaluator(bb, embedded_sequence(T), method, num_images=2, num_inference_steps=2, dc_timesteps=2,
                                dc_images=2, seed=3)
        rows.append(ev.evaluate_row(1))
        assert all(math.isnan(v) for v in ev.matrix["dc_acc"][0][1:])  # a concept before its task: not measured
    for m in rows[0]:
        assert rows[0][m][:2] == rows[1][m][:2], m



def test_a_row_in_one_batched_pass_equals_concept_by_concept():
    """One model for every concept (naive): the row's samples and held-out losses come from one
    batched pass each, with each concept's own noise, so they equal the one-by-one path; routed
    methods are evaluated one by one; --dc_eval_images 0 measures no dc_acc."""
    from fastcp.data.concepts import embedded_sequence
    from fastcp.eval.metrics import ContinualEvaluator
    from fastcp.methods import get_method
    from fastcp.models import load_backbone
    from fastcp.train import make_args

    bb = load_backbone("tiny")
    bb.unet.eval()
    seq = embedded_sequence(3)
    ev = ContinualEvaluator(bb, seq, get_method("naive")(make_args(method="naive")), num_images=3,
                            num_inference_steps=3, dc_images=0, seed=5, sample_batch_size=4)
    assert ev.batch_concepts and "dc_acc" not in ev.metrics and "dc_acc" not in ev.evaluate_row(2)
    together = ev.generate_many([0, 1, 2])  # 9 samples in passes of at most 4: chunks cross concepts
    for j in range(3):
        assert torch.allclose(together[j], ev.generate(j), atol=1e-4), j
    both = ev.holdout_losses([0, 2])
    assert both[0] == pytest.approx(ev.holdout_loss(0), rel=1e-5)
    assert both[2] == pytest.approx(ev.holdout_loss(2), rel=1e-5)
    assert both[0] != pytest.approx(both[2], rel=1e-3)  # each concept its own images and prompt
    assert not ContinualEvaluator(bb, seq, get_method("separate")(make_args(method="separate"))).batch_concepts


def _cli(out, *extra) -> tuple[int, str]:
    """``python -m fastcp.train`` in this process: (exit status, stderr)."""
    import contextlib
    import io

    from fastcp import train

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train.main(["--output_dir", str(out), "--max_concepts", "2", "--max_train_steps", "2",
                         "--train_batch_size", "2", "--num_eval_images", "2", "--eval_inference_steps", "2",
                         "--dc_timesteps", "2", "--dc_eval_images", "2", *extra])
    return rc, err.getvalue()


def test_clip_and_dino_matrices_in_a_run(tmp_path, models):
    clip_dir, dino_dir = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {}\n")
    out = tmp_path / "run"
    rc, err = _cli(out, "--clip_model", str(clip_dir), "--dino_model", str(dino_dir), "--eval_prompts", str(prompts),
                   "--forgetting_norm", "t")
    assert rc == 0, err[-2000:]
    res = json.loads((out / "results.json").read_text())
    for m in ("fidelity", "clip_i", "clip_t", "dino", "dc_acc", "holdout_loss"):
        mat = np.array(res["metrics"][m]["matrix"], dtype=float)
        assert mat.shape == (2, 2) and np.isnan(mat[0, 1]), m
        assert np.isfinite(mat[np.tril_indices(2)]).all(), m
        if m in ("clip_i", "clip_t", "dino"):
            assert (np.abs(mat[np.tril_indices(2)]) <= 1 + 1e-6).all(), m
        col0 = mat[:, 0]
        drop = (col0.max() - mat[1, 0]) if m != "holdout_loss" else (mat[1, 0] - col0.min())
        assert res["metrics"][m]["forgetting"] == pytest.approx(drop / 2), m  # ÷T
    for n in (1, 2):
        assert (out / f"samples_task_{n:02d}.png").is_file()


def test_missing_or_wrong_feature_model_is_one_line(tmp_path, models):
    for flag, path, says in (("--clip_model", tmp_path / "nope", "is not a directory"),
                             ("--clip_model", models[1], "not CLIP"),
                             ("--dino_model", models[0], "not an image backbone"),
                             ("--eval_prompts", tmp_path / "nope.txt", "cannot be read")):
        out = tmp_path / f"o{len(says)}"
        rc, err = _cli(out, flag, str(path))
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
