"""python -m fastcp.train: a short end-to-end run, the results.json schema, and bad input."""
import json
import subprocess
import sys
from pathlib import Path


from fastcp.data.concepts import export_embedded_sequence

TINY = ["--max_train_steps", "2", "--num_eval_images", "2", "--eval_inference_steps", "2",
        "--dc_timesteps", "2", "--dc_eval_images", "2", "--train_batch_size", "2"]


def run_cli(*args, cwd=None):
    """Run the CLI in a fresh process, as a user would (never from the repo root: see kernels/)."""
    return subprocess.run([sys.executable, "-P", "-m", "fastcp.train", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def check_results_schema(results: dict, num_concepts: int):
    assert set(results) == {"method", "backbone", "concepts", "seed", "seconds", "metrics", "config"}
    assert isinstance(results["method"], str) and isinstance(results["backbone"], str)
    assert isinstance(results["seed"], int) and isinstance(results["seconds"], float)
    assert len(results["concepts"]) == num_concepts and all(isinstance(c, str) for c in results["concepts"])
    assert {"fidelity", "dc_acc", "holdout_loss"} <= set(results["metrics"])
    for name, m in results["metrics"].items():
        assert set(m) == {"matrix", "average", "forgetting"}, name
        assert len(m["matrix"]) == num_concepts and all(len(r) == num_concepts for r in m["matrix"])
        assert all(isinstance(v, float) for n, r in enumerate(m["matrix"]) for v in r[: n + 1]), name
        assert all(v is None for n, r in enumerate(m["matrix"]) for v in r[n + 1:]), name  # before its task
        assert isinstance(m["average"], float) and isinstance(m["forgetting"], float)
    assert results["config"]["method"] == results["method"]


def test_two_task_smoke_run_writes_every_file(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--output_dir", out, "--max_concepts", "2", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    check_results_schema(results, 2)
    assert results["backbone"] == "tiny" and results["method"] == "naive"
    for metric in results["metrics"]:
        assert (out / f"{metric}_heatmap.png").stat().st_size > 1000
    assert (out / "samples.png").stat().st_size > 1000
    for n, name in enumerate(results["concepts"], 1):
        assert (out / f"task_{n:02d}_{name}" / "pytorch_lora_weights.safetensors").is_file()
        assert (out / f"task_{n:02d}_{name}" / "learned_embeds.safetensors").is_file()
    assert "forgetting" in proc.stdout  # the summary table
    log = json.loads((out / "train_log.json").read_text())["tasks"]
    assert [t["device"] for t in log] == ["cpu", "cpu"]  # accelerator.device: the GPU where there is one
    assert all(t["seconds_per_step"] > 0 and t["peak_memory_gb"] == 0.0 and t["num_processes"] == 1 for t in log)
    # A second run into the same folder refuses instead of overwriting finished work.
    again = run_cli("--output_dir", out, "--max_concepts", "1", *TINY, cwd=tmp_path)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


def _assert_clean_failure(proc, out: Path, needle: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    err = [l for l in lines if not l.startswith("fastcp.train: warning:")]
    assert len(err) == 1 and err[0].startswith("fastcp.train: error:"), proc.stderr[-2000:]
    assert needle in err[0]
    assert not out.exists(), "nothing may be written on bad input"


def test_unknown_method(tmp_path):
    out = tmp_path / "o"
    _assert_clean_failure(run_cli("--output_dir", out, "--method", "nope", cwd=tmp_path), out, "unknown method 'nope'")


def test_missing_and_empty_folders(tmp_path):
    out = tmp_path / "o"
    _assert_clean_failure(run_cli("--output_dir", out, "--instance_data_dir", tmp_path / "missing",
                                  "--instance_prompt", "a photo of <v1> dog", cwd=tmp_path), out, "does not exist")
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(run_cli("--output_dir", out, "--concepts_dir", tmp_path / "empty", cwd=tmp_path), out,
                          "has no concept sub-folder")
    (tmp_path / "emptyimgs" / "dog").mkdir(parents=True)
    _assert_clean_failure(run_cli("--output_dir", out, "--concepts_dir", tmp_path / "emptyimgs", cwd=tmp_path), out,
                          "is empty")


def test_corrupt_image_only_folder_and_bad_backbone(tmp_path):
    out = tmp_path / "o"
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG garbage")
    _assert_clean_failure(run_cli("--output_dir", out, "--instance_data_dir", bad,
                                  "--instance_prompt", "a photo of <v1> dog", cwd=tmp_path), out, "no readable image")
    _assert_clean_failure(run_cli("--output_dir", out, "--pretrained_model_name_or_path", tmp_path / "nomodel",
                                  cwd=tmp_path), out, "neither 'tiny' nor an existing directory")


def test_sequence_file_with_a_corrupt_image_is_skipped_with_a_warning(tmp_path):
    seq = export_embedded_sequence(tmp_path / "data", num_concepts=1)
    train_dir = next((tmp_path / "data").glob("*/train"))
    (train_dir / "zz_broken.png").write_bytes(b"broken")
    out = tmp_path / "o"
    proc = run_cli("--output_dir", out, "--concepts", seq, *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping" in proc.stderr and "zz_broken.png" in proc.stderr
    check_results_schema(json.loads((out / "results.json").read_text()), 1)
