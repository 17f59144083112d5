"""Two processes (torchrun or accelerate launch, gloo on CPU) give the adapters of one process with the same
global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--max_concepts", "2", "--max_train_steps", "4", "--num_eval_images", "2", "--eval_inference_steps", "2",
        "--dc_timesteps", "2", "--dc_eval_images", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    """One process with the global batch of 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    run = subprocess.run([sys.executable, "-P", "-m", "fastcp.train", "--output_dir", str(out), *ARGS,
                          "--train_batch_size", "4"], capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def launcher(name: str) -> list[str]:
    port = str(free_port())
    if name == "torchrun":
        return [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", port]
    # accelerate: on a machine without GPUs, --cpu would run ONE process (accelerate's simple launcher);
    # --multi_gpu makes it start the processes through torch.distributed.run, and fastcp picks gloo.
    return [sys.executable, "-P", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]


@pytest.mark.parametrize("name", ["torchrun", "accelerate"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, single_process_run, name):
    one, two = single_process_run, tmp_path / "two"
    cmd = [*launcher(name), "-m", "fastcp.train", "--output_dir", str(two), *ARGS, "--train_batch_size", "2"]
    dist = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"})
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert dist.stdout.count("finished in") == 1  # only rank 0 reports and writes
    a, b = sorted(one.glob("task_*/*.safetensors")), sorted(two.glob("task_*/*.safetensors"))
    assert [p.relative_to(one) for p in a] == [p.relative_to(two) for p in b] and len(a) == 4
    for pa, pb in zip(a, b):
        ta, tb = load_file(str(pa)), load_file(str(pb))
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5)
    ra, rb = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
    # held-out losses are continuous in the weights; fidelity/dc_acc are counts that a 1e-6 change may flip
    loss_a = sum(ra["metrics"]["holdout_loss"]["matrix"], [])
    loss_b = sum(rb["metrics"]["holdout_loss"]["matrix"], [])
    assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(loss_a, loss_b))
