"""A run killed with SIGKILL in the middle of a task and resumed ends exactly like an uninterrupted one."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--max_concepts", "2", "--max_train_steps", "20", "--checkpointing_steps", "5", "--train_batch_size", "2",
        "--num_eval_images", "2", "--eval_inference_steps", "2", "--dc_timesteps", "2", "--dc_eval_images", "2"]


def cli(out, *extra):
    return [sys.executable, "-P", "-m", "fastcp.train", "--output_dir", str(out), *ARGS, *extra]


def adapters(out: Path) -> dict:
    return {p.parent.name + "/" + p.name: load_file(str(p)) for p in sorted(out.glob("task_*/*.safetensors"))}


def test_sigkill_mid_task_then_resume_matches_uninterrupted(tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run(cli(ref_out), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(cli(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    target = out / "checkpoints" / "checkpoint-001-0000005-train"  # task 2, step 5 of 20
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert target.exists(), "the run never reached the middle of task 2"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "killed too late: the run had finished"
    assert (out / "task_01_checker_star" / "pytorch_lora_weights.safetensors").is_file()  # finished work kept

    resumed = subprocess.run(cli(out, "--resume_from_checkpoint", "latest"), capture_output=True, text=True,
                             timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    a = json.loads((ref_out / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert a["metrics"] == b["metrics"]
    ta, tb = adapters(ref_out), adapters(out)
    assert ta.keys() == tb.keys() and len(ta) == 4
    for k in ta:
        for name in ta[k]:
            assert torch.equal(ta[k][name], tb[k][name]), (k, name)


@pytest.fixture(scope="module")
def one_task_run(tmp_path_factory):
    """A finished 1-concept run (trained once for the module; each test works on its own copy)."""
    root = tmp_path_factory.mktemp("one_task")
    first = subprocess.run(cli(root / "o", "--max_concepts", "1"), capture_output=True, text=True, timeout=600, cwd=root)
    assert first.returncode == 0, first.stderr[-2000:]
    return root / "o"


def interrupted_copy(one_task_run, tmp_path) -> Path:
    """The run as if killed after its last checkpoint: no results.json."""
    out = tmp_path / "o"
    shutil.copytree(one_task_run, out)
    (out / "results.json").unlink()
    return out


def test_resume_refuses_a_different_run(tmp_path, one_task_run):
    out = interrupted_copy(one_task_run, tmp_path)
    other = subprocess.run(cli(out, "--max_concepts", "1", "--seed", "7", "--resume_from_checkpoint", "latest"),
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert other.returncode == 2 and "belongs to a different run (differs in seed)" in other.stderr
    missing = subprocess.run(cli(tmp_path / "none", "--resume_from_checkpoint", "latest"), capture_output=True,
                             text=True, timeout=600, cwd=tmp_path)
    assert missing.returncode == 2 and "no checkpoint in" in missing.stderr


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_resume_refuses_a_planted_pickle_payload_without_running_it(tmp_path, one_task_run):
    import pickle

    out = interrupted_copy(one_task_run, tmp_path)
    latest = max((out / "checkpoints").glob("checkpoint-*"))
    pickled = [p for p in latest.iterdir() if p.suffix in (".bin", ".pkl", ".pt")]
    assert pickled, "accelerate's state files are expected in the checkpoint"
    marker = tmp_path / "payload_ran"
    for p in pickled:
        p.write_bytes(pickle.dumps(_Payload(marker)))
    resumed = subprocess.run(cli(out, "--max_concepts", "1", "--resume_from_checkpoint", "latest"),
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 2
    err = resumed.stderr.strip().splitlines()
    assert len(err) == 1 and "holds pickled objects that could run code" in err[0] and "refusing to load it" in err[0]
    assert not marker.exists()
