"""N processes train exactly like one process with the N-times batch, for every kind of method.

Two CPU processes (gloo) under ``accelerate launch`` — and ``torchrun`` for naive — against one
process with the same global batch: the adapters agree to 1e-5 for naive, merge, ewc_dc, dsc and
fl2t (every per-step draw is made once for the global batch; DC terms are averaged over the
global batch's DC images even when one process holds them all), and the evaluation split over
processes gives exactly the single-process matrices.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DRIVER = Path(__file__).parent / "helpers" / "distributed_runs.py"
METHODS = ["naive", "merge", "ewc_dc", "dsc", "fl2t"]
ENV = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(name: str) -> list[str]:
    port = str(free_port())
    if name == "torchrun":
        return [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", port]
    # accelerate on a machine without GPUs: --multi_gpu makes it start 2 processes (torch.distributed.run
    # underneath); --cpu alone would start one. accelerate then picks gloo.
    return [sys.executable, "-P", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]


def drive(cmd: list[str], root: Path, batch: int, names: list[str]) -> None:
    proc = subprocess.run([*cmd, str(DRIVER), str(root), str(batch), *names], capture_output=True, text=True,
                          timeout=1200, cwd=root.parent, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished in") == len(names)  # only rank 0 reports


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process with the global batch of 4."""
    root = tmp_path_factory.mktemp("one") / "runs"
    drive([sys.executable, "-P"], root, 4, [*METHODS, "eval_split"])
    return root


def adapters(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): load_file(str(p)) for p in sorted(run.glob("task_*/*.safetensors"))}


def assert_same_adapters(one: Path, two: Path) -> None:
    a, b = adapters(one), adapters(two)
    assert a.keys() == b.keys() and len(a) == 4
    for f in a:
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=1e-5, atol=1e-5, msg=f"{one.name}: {f} {k}")


def test_two_accelerate_processes_match_one_for_every_method(tmp_path, single):
    root = tmp_path / "runs"
    drive(launcher("accelerate"), root, 2, [*METHODS, "eval_split"])
    for m in METHODS:
        assert_same_adapters(single / m, root / m)
        log = json.loads((root / m / "train_log.json").read_text())
        assert all(t["num_processes"] == 2 for t in log["tasks"])
    one = json.loads((single / "eval_split" / "results.json").read_text())["metrics"]
    two = json.loads((root / "eval_split" / "results.json").read_text())["metrics"]
    assert one == two  # exactly: each concept is evaluated whole by one process


def test_torchrun_matches_one_process(tmp_path, single):
    root = tmp_path / "runs"
    drive(launcher("torchrun"), root, 2, ["naive"])
    assert_same_adapters(single / "naive", root / "naive")
