"""Every CP method survives a two-task run through ``fastcp.train.main`` and writes a valid
results.json; ``python -m fastcp.experiments compare`` aggregates runs into the table files."""
import json
import os
import math

import pytest

from fastcp import train
from fastcp.methods import METHODS

TINY = ["--max_train_steps", "2", "--max_concepts", "2", "--num_eval_images", "2", "--eval_inference_steps", "2",
        "--dc_timesteps", "2", "--dc_eval_images", "2", "--train_batch_size", "2", "--dc_images", "2",
        "--fisher_images", "2", "--fisher_timesteps", "2"]
NEW = ["ortho", "magmax", "clora", "ewc_dc", "dsc", "dsc_ewc", "fl2t", "joint", "separate"]


def test_every_method_is_registered():
    assert set(NEW) <= set(METHODS)


def run(tmp_path, method, *extra):
    out = tmp_path / method
    assert train.main(["--method", method, "--output_dir", str(out), *TINY, *extra]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", NEW)
def test_two_task_smoke_run(tmp_path, method):
    out, results = run(tmp_path, method)
    assert results["method"] == method and results["config"]["method"] == method
    assert len(results["concepts"]) == 2
    for name, m in results["metrics"].items():
        assert len(m["matrix"]) == 2 and all(len(r) == 2 for r in m["matrix"])
        # measured from each concept's own task on (j <= n); a concept before its task is null
        assert all(isinstance(v, float) and math.isfinite(v) for n, r in enumerate(m["matrix"]) for v in r[: n + 1]), name
        assert all(v is None for n, r in enumerate(m["matrix"]) for v in r[n + 1:]), name
        assert math.isfinite(m["average"]) and math.isfinite(m["forgetting"])
    for n, name in enumerate(results["concepts"], 1):
        assert (out / f"task_{n:02d}_{name}" / "pytorch_lora_weights.safetensors").is_file()


def test_magmax_topk_and_fl2t_concurrent_set_run(tmp_path):
    run(tmp_path, "magmax", "--mask_topk", "0.1")
    run(tmp_path, "fl2t", "--fl2t_set_size", "0")


@pytest.mark.parametrize("flag,value", [("--mask_topk", "1.5"), ("--ewc_gamma", "2"), ("--dc_temperature", "0"),
                                        ("--dc_concepts", "-1"), ("--clora_lambda", "-1")])
def test_bad_method_hyperparameter_is_a_clean_error(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        train.main(["--method", "magmax", "--output_dir", str(tmp_path / "o"), *TINY, flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "expected" in err
    assert not (tmp_path / "o").exists()


def test_compare_writes_json_and_markdown(tmp_path, capfd):
    from fastcp import experiments

    stem = tmp_path / "cp"
    rc = experiments.main(["compare", "--methods", "naive,merge", "--seeds", "0", "1", "--runs_dir", str(tmp_path / "runs"),
                           "--results", str(stem), "--jobs", "2", "--", *TINY])  # two runs at once
    assert rc == 0
    summary = json.loads(stem.with_suffix(".json").read_text())
    assert summary["jobs"] == 2 and summary["omp_num_threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert set(summary["methods"]) == {"naive", "merge"}
    for m in summary["methods"].values():
        assert m["runs"] == 2 and m["seeds"] == [0, 1]
        for metric in ("fidelity", "dc_acc", "holdout_loss"):
            for key in ("average", "forgetting", "learned"):
                assert set(m["metrics"][metric][key]) == {"mean", "std"}
        assert m["seconds_per_task"]["mean"] > 0
    assert summary["methods"]["naive"]["time_vs_naive"] == pytest.approx(1.0)
    md = stem.with_suffix(".md").read_text()
    assert "| `naive` |" in md and "| `merge` |" in md
    # A finished run is reused, not redone; an interrupted one (checkpoints, no results.json) resumes.
    finished, interrupted = (tmp_path / "runs" / "naive" / f"seed_{s}" / "results.json" for s in (0, 1))
    stamp = finished.stat().st_mtime_ns
    interrupted.unlink()
    capfd.readouterr()
    assert experiments.main(["compare", "--methods", "naive", "--seeds", "0", "1", "--runs_dir", str(tmp_path / "runs"),
                             "--results", str(stem), "--", *TINY]) == 0
    assert finished.stat().st_mtime_ns == stamp and interrupted.exists()
    assert "resuming from" in capfd.readouterr().out
