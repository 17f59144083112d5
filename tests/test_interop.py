"""Interop with diffusers' conventions: Custom Diffusion ``concepts_list`` files, Hub model ids read
from the local Hugging Face cache (offline), and ``--init_lora`` (task 1 starts from a LoRA file)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastcp import checkpoint, train
from fastcp.data.concepts import DataError, embedded_sequence, load_sequence_file, save_image_folder
from fastcp.methods import get_method
from fastcp.models import load_backbone
from fastcp.models.lora_io import save_lora_adapter
from fastcp.models.testing import make_tiny_sd_pipeline
from fastcp.nn import ATTENTION_TARGETS, FEEDFORWARD_TARGETS, inject_multi_lora

EVAL = ["--num_eval_images", "1", "--eval_inference_steps", "2", "--dc_timesteps", "2", "--dc_eval_images", "1",
        "--train_batch_size", "2"]
HUB_ID = "fastcp-test/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A Hugging Face cache folder laid out as huggingface_hub writes it, holding a tiny random SD
    pipeline as ``fastcp-test/tiny-sd`` (refs/main -> snapshots/<commit>/)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--fastcp-test--tiny-sd"
    make_tiny_sd_pipeline(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def offline(monkeypatch):
    """No network for the test: offline mode on and every socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network used: connect{args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _concept_images(root, names):
    """Image folders root/<name>/ of embedded concept renderings (32 px)."""
    for name, c in zip(names, embedded_sequence(len(names))):
        save_image_folder(c.train_images[:4], root / name)


# --------------------------------------------------------------------------- concepts_list
def test_concepts_list_becomes_the_task_sequence(tmp_path):
    data = tmp_path / "data"
    _concept_images(data / "imgs", ["cat"])
    _concept_images(data / "other", ["cat"])
    _concept_images(data / "more", ["toy"])
    entries = [
        {"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat", "instance_data_dir": "./imgs/cat",
         "class_data_dir": "./real_reg/samples_cat"},
        {"instance_prompt": "a <new2> sitting on a bench", "class_prompt": "photo of a dog",
         "instance_data_dir": "other/cat", "class_data_dir": None},
        {"instance_prompt": "a <new3> toy, on a table", "instance_data_dir": str(data / "more" / "toy")},
    ]
    (data / "concepts_list.json").write_text(json.dumps(entries))
    seq = load_sequence_file(data / "concepts_list.json", 32)
    assert [c.name for c in seq] == ["cat", "cat_2", "toy"]  # instance folders; a repeated name made unique
    assert [c.token for c in seq] == ["<new1>", "<new2>", "<new3>"]
    assert [c.prompt for c in seq] == [e["instance_prompt"] for e in entries]
    # class word: class_prompt's last word, else the word after the token
    assert [c.class_word for c in seq] == ["cat", "dog", "toy"]
    assert [c.class_prompt for c in seq] == ["cat", "photo of a dog", "a photo of a toy"]
    assert seq[0].class_data_dir == str(data / "real_reg" / "samples_cat")  # relative to the file's folder
    assert seq[1].class_data_dir is None and seq[2].class_data_dir is None
    assert seq[0].train_images.shape == (4, 3, 32, 32)

    # the CLI takes it as --concepts (told apart by its keys) and as --concepts_list (diffusers' flag)
    for flag in ("--concepts", "--concepts_list"):
        args = train.build_parser().parse_args(["--output_dir", "o", flag, str(data / "concepts_list.json")])
        assert [c.name for c in train.load_sequence(args, 32)] == ["cat", "cat_2", "toy"]
    # --instance_prompt finds its token the same way
    args = train.build_parser().parse_args(["--output_dir", "o", "--instance_data_dir", str(data / "imgs" / "cat"),
                                            "--instance_prompt", "photo of a <new1>'s cat"])
    assert train.load_sequence(args, 32)[0].token == "<new1>"
    args.instance_prompt = "photo of a cat"
    with pytest.raises(DataError, match="--instance_prompt 'photo of a cat' has no placeholder token"):
        train.load_sequence(args, 32)


@pytest.mark.parametrize("entry, message", [
    ({"instance_prompt": "photo of a cat", "instance_data_dir": "imgs/cat"}, "has no placeholder token"),
    ({"instance_prompt": "<new1> and <new2>", "instance_data_dir": "imgs/cat"}, "several placeholder tokens"),
    ({"instance_prompt": "a <new1> cat"}, "has no instance_data_dir"),
    ({"instance_prompt": "a <new1> cat", "instance_data_dir": "imgs/cat", "modifier_token": "<new1>"}, "unknown key"),
    ({"instance_prompt": "a <new1> cat", "instance_data_dir": "imgs/missing"}, "does not exist"),
])
def test_bad_concepts_list_entries_are_one_line_errors(tmp_path, entry, message):
    _concept_images(tmp_path / "imgs", ["cat"])
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    with pytest.raises(DataError, match=message) as err:
        load_sequence_file(tmp_path / "list.json", 32)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- Hub ids from the cache
def test_hub_id_loads_from_the_local_cache_offline(hf_cache, offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))  # what HF_HUB_CACHE sets at import
    bb = load_backbone(HUB_ID)
    assert bb.name == HUB_ID and bb.vae is not None and bb.sample_size == 32
    local = load_backbone(hf_cache / "models--fastcp-test--tiny-sd" / "snapshots" / COMMIT)
    assert all(torch.equal(a, b) for a, b in zip(bb.unet.state_dict().values(), local.unet.state_dict().values()))
    assert load_backbone(HUB_ID, revision=COMMIT).name == HUB_ID  # a commit hash needs no ref
    with pytest.raises(ValueError, match="not in the Hugging Face cache at revision 'v2'"):
        load_backbone(HUB_ID, revision="v2")
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache .*hf download fastcp-test/nothing") as err:
        load_backbone("fastcp-test/nothing")
    assert "\n" not in str(err.value)


def test_missing_hub_id_is_a_one_line_cli_error(tmp_path, offline, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    out = tmp_path / "o"
    assert train.main(["--output_dir", str(out), "--pretrained_model_name_or_path", "runwayml/stable-diffusion-v1-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastcp.train: error: backbone: 'runwayml/stable-diffusion-v1-5' is "
                                               "not a local directory and not in the Hugging Face cache")
    assert "hf download runwayml/stable-diffusion-v1-5" in err[0] and not out.exists()


def test_cli_run_from_a_concepts_list_on_a_cached_hub_model(hf_cache, tmp_path):
    """The whole path a diffusers user takes: a Custom Diffusion concepts_list, a Hub id resolved
    through HF_HUB_CACHE with the network unreachable, prior preservation fed by the list's
    class_prompt/class_data_dir (class images generated into the list-relative folder)."""
    data = tmp_path / "data"
    _concept_images(data, ["cat", "dog"])
    entries = [{"instance_prompt": f"photo of a <new{i}> {n}", "class_prompt": n, "instance_data_dir": n,
                "class_data_dir": f"real_reg/samples_{n}"} for i, n in enumerate(["cat", "dog"], 1)]
    (data / "concepts_list.json").write_text(json.dumps(entries))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # any request would fail
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "fastcp.train", "--output_dir", str(out), "--pretrained_model_name_or_path",
         HUB_ID, "--concepts_list", str(data / "concepts_list.json"), "--max_train_steps", "2", "--rank", "2",
         "--with_prior_preservation", "--num_class_images", "2", *EVAL],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["backbone"] == HUB_ID and results["concepts"] == ["cat", "dog"]
    for n, name in enumerate(["cat", "dog"], 1):
        assert (out / f"task_{n:02d}_{name}" / "pytorch_lora_weights.safetensors").is_file()
        assert set(load_file(out / f"task_{n:02d}_{name}" / "learned_embeds.safetensors")) == {f"<new{n}>"}
        assert len(list((data / "real_reg" / f"samples_{name}").glob("*.png"))) == 2


# --------------------------------------------------------------------------- --init_lora
def _lora_file(path, targets, rank, seed=0, alpha=None):
    """A diffusers/peft LoRA file for the tiny model's layers ``targets`` with random A and B."""
    bb = load_backbone("tiny")
    layers = inject_multi_lora(bb.unet, num_adapters=1, rank=rank, alpha=alpha, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g))
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g))
    return save_lora_adapter(bb.unet, path)


def test_first_task_starts_from_the_init_lora_file(tmp_path):
    """With both learning rates 0, task 1's saved adapter is the init file exactly (rank 4 < --rank
    8, the file's alpha kept); task 2 starts fresh."""
    init = _lora_file(tmp_path / "init", ATTENTION_TARGETS + FEEDFORWARD_TARGETS, rank=4, alpha=6.0)
    out = tmp_path / "run"
    assert train.main(["--output_dir", str(out), "--max_concepts", "2", "--max_train_steps", "1", "--method", "merge",
                       "--learning_rate", "0", "--token_learning_rate", "0", "--init_lora", str(tmp_path / "init"),
                       *EVAL]) == 0
    task1 = next(out.glob("task_01_*")) / "pytorch_lora_weights.safetensors"
    want, got = load_file(init), load_file(task1)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads(__import__("safetensors").safe_open(str(task1), "pt").metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 6.0
    task2 = load_file(next(out.glob("task_02_*")) / "pytorch_lora_weights.safetensors")
    assert all(not v.any() for k, v in task2.items() if "lora_B" in k)  # fresh: B = 0, nothing learned at lr 0


def test_bad_init_lora_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    full = ATTENTION_TARGETS + FEEDFORWARD_TARGETS
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    bad_meta = tmp_path / "bad_meta.safetensors"
    save_file(load_file(_lora_file(tmp_path / "src", full, rank=2)), str(bad_meta), {"lora_adapter_metadata": "{nope"})
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(kohya))
    cases = [
        (tmp_path / "missing", [], "does not exist"),
        (garbage, [], "is not a safetensors file"),
        (bad_meta, [], "unreadable lora_adapter_metadata"),
        (kohya, [], "kohya/A1111"),
        (_lora_file(tmp_path / "attn", ATTENTION_TARGETS, rank=4), [], "does not cover the layers this run trains"),
        (_lora_file(tmp_path / "big", full, rank=16), [], "has rank 16 > --rank 8; pass --rank 16"),
        (_lora_file(tmp_path / "ok", full, rank=4), ["--method", "fl2t", "--fl2t_set_size", "2"], "fl2t"),
    ]
    for path, extra, message in cases:
        out = tmp_path / "o"
        assert train.main(["--output_dir", str(out), "--max_concepts", "1", "--init_lora", str(path), *extra]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastcp.train: error: --init_lora: "), err
        assert message in err[0] and not out.exists()
    # the attention-only file is fine once the run's targets match it
    out = tmp_path / "o"
    args = train.make_args(output_dir=str(out), lora_targets="attn", init_lora=tmp_path / "attn")
    from fastcp.models.lora_init import validate_init_lora

    validate_init_lora(args, load_backbone("tiny"))


def test_init_lora_content_is_in_the_fingerprint(tmp_path):
    a = _lora_file(tmp_path / "a", ATTENTION_TARGETS, rank=2, seed=0)
    b = _lora_file(tmp_path / "b", ATTENTION_TARGETS, rank=2, seed=1)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / a.name).write_bytes(a.read_bytes())
    concepts = embedded_sequence(1)

    def fp(init):
        args = train.make_args(init_lora=init)
        return checkpoint.fingerprint(args, concepts, get_method(args.method)(args))

    assert fp(None)["init_lora_sha256"] is None
    assert fp(tmp_path / "a")["init_lora_sha256"] == fp(tmp_path / "copy")["init_lora_sha256"]  # content, not path
    assert fp(tmp_path / "a") != fp(b)
