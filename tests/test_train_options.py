"""Memory/precision/logging options of python -m fastcp.train."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

BASE = ["--max_concepts", "1", "--max_train_steps", "3", "--num_eval_images", "2", "--eval_inference_steps", "2",
        "--dc_timesteps", "2", "--dc_eval_images", "2"]


def run(out, *extra):
    return subprocess.run([sys.executable, "-P", "-m", "fastcp.train", "--output_dir", str(out), *BASE, *extra],
                          capture_output=True, text=True, timeout=600, cwd=out.parent)


def adapter(out):
    return load_file(str(next(out.glob("task_01_*/pytorch_lora_weights.safetensors"))))


def assert_same_adapter(a, b, tol=1e-5):
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=tol, atol=tol)


def test_accumulation_and_checkpointing_give_the_big_batch_result(tmp_path):
    big = tmp_path / "big"
    assert run(big, "--train_batch_size", "4").returncode == 0
    acc = tmp_path / "acc"
    p = run(acc, "--train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_adapter(big, acc)
    ckpt = tmp_path / "gc"
    p = run(ckpt, "--train_batch_size", "4", "--gradient_checkpointing")
    assert p.returncode == 0, p.stderr[-2000:]
    assert_same_adapter(big, ckpt)


def test_bf16_autocast_and_tensorboard(tmp_path):
    out = tmp_path / "tb"
    p = run(out, "--mixed_precision", "bf16", "--report_to", "tensorboard", "--train_batch_size", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert all(torch.isfinite(t).all() for t in adapter(out).values())


@pytest.mark.parametrize("flag,module", [(["--use_8bit_adam"], "bitsandbytes"),
                                         (["--enable_xformers_memory_efficient_attention"], "xformers"),
                                         (["--report_to", "wandb"], "wandb")])
def test_missing_optional_package_is_a_clean_error(tmp_path, flag, module):
    if importlib.util.find_spec(module) is not None:  # installed (a GPU machine): the flag must then work
        p = run(tmp_path / "o", *flag)
        assert p.returncode == 0 or "CUDA" in p.stderr, p.stderr[-2000:]
        return
    p = run(tmp_path / "o", *flag)
    assert p.returncode == 2 and f"needs the {module} package" in p.stderr
    assert not (tmp_path / "o").exists()
