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
    # Every finished run left its record beside the table, with the run's own numbers and threads.
    records = experiments.records_dir(stem)
    rec = json.loads(experiments.record_path(records, "naive", 0).read_text())
    assert rec["train_args"] == TINY and rec["threads"] == int(summary["omp_num_threads"]) and len(rec["tasks"]) == 2
    assert rec["results"] == json.loads((tmp_path / "runs" / "naive" / "seed_0" / "results.json").read_text())
    # A finished run is reused, not redone; an interrupted one (checkpoints, no results.json, no record) resumes.
    finished, interrupted = (tmp_path / "runs" / "naive" / f"seed_{s}" / "results.json" for s in (0, 1))
    stamp = finished.stat().st_mtime_ns
    interrupted.unlink()
    experiments.record_path(records, "naive", 1).unlink()
    capfd.readouterr()
    assert experiments.main(["compare", "--methods", "naive", "--seeds", "0", "1", "--runs_dir", str(tmp_path / "runs"),
                             "--results", str(stem), "--", *TINY]) == 0
    assert finished.stat().st_mtime_ns == stamp and interrupted.exists()
    assert "resuming from" in capfd.readouterr().out


def test_records_outlive_the_run_directories_and_prior_rows_pool_exactly(tmp_path):
    """A fresh checkout has the committed records but no outputs/: the table is rebuilt from the
    records alone and nothing is rerun. Rows known only by an earlier table's statistics
    (prior_summary.json) pool with new records into exactly the statistics of all the runs."""
    import shutil

    from fastcp import experiments

    stem, runs = tmp_path / "cp", tmp_path / "runs"
    args = ["compare", "--methods", "naive", "--seeds", "0", "1", "--runs_dir", str(runs), "--results", str(stem), "--jobs", "2"]
    assert experiments.main([*args, "--", *TINY]) == 0
    full = json.loads(stem.with_suffix(".json").read_text())["methods"]["naive"]
    shutil.rmtree(runs)
    assert experiments.main([*args, "--", *TINY]) == 0
    assert not runs.exists()  # nothing was rerun
    again = json.loads(stem.with_suffix(".json").read_text())["methods"]["naive"]
    assert again == full
    # other training arguments do not count as the same run
    records = experiments.records_dir(stem)
    assert experiments.read_record(experiments.record_path(records, "naive", 0), TINY[:-2]) is None

    # seed 0 known only through a prior table's row, seed 1 through its record
    rec0 = json.loads(experiments.record_path(records, "naive", 0).read_text())
    row0 = experiments.aggregate({"naive": [{"results": rec0["results"],
                                             "task_seconds": [t["train_seconds"] for t in rec0["tasks"]],
                                             "peak_gb": experiments._run_peak_gb(rec0)}]})["naive"]
    prior = {"commit": "abc1234", "train_args": TINY,
             "methods": {"naive": {**row0, "tasks_per_run": len(rec0["tasks"]), "peak_runs": 1}}}
    (records / experiments.PRIOR_FILE).write_text(json.dumps(prior))
    experiments.record_path(records, "naive", 0).unlink()
    assert experiments.main([*args, "--available", "--", *TINY]) == 0
    pooled = json.loads(stem.with_suffix(".json").read_text())["methods"]["naive"]
    assert pooled["seeds"] == [0, 1] and pooled["runs"] == 2 and pooled["pooled_from_prior"] == [0]
    for name, m in full["metrics"].items():
        for key, st in m.items():
            assert pooled["metrics"][name][key]["mean"] == pytest.approx(st["mean"], abs=1e-12), (name, key)
            assert pooled["metrics"][name][key]["std"] == pytest.approx(st["std"], abs=1e-12), (name, key)
    for key in ("seconds_per_task", "peak_memory_gb"):
        assert pooled[key]["mean"] == pytest.approx(full[key]["mean"]) and pooled[key]["std"] == pytest.approx(full[key]["std"])
    assert "Pooled from `prior_summary.json`" in stem.with_suffix(".md").read_text()
    # --readme rewrites only the marked block; a file without the markers is an error and stays as it was
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\nbefore\n{experiments.README_BEGIN} -->\nstale\n{experiments.README_END}\nafter\n")
    assert experiments.main([*args, "--available", "--readme", str(readme), "--", *TINY]) == 0
    text = readme.read_text()
    assert text.startswith("# t\nbefore\n") and text.endswith(f"{experiments.README_END}\nafter\n")
    assert "stale" not in text and "| `naive` |" in text and "Pooled from" in text
    readme.write_text("no markers\n")
    assert experiments.main([*args, "--available", "--readme", str(readme), "--", *TINY]) == 2
    assert readme.read_text() == "no markers\n"


def test_pooled_statistics_equal_those_of_all_the_values():
    import numpy as np

    from fastcp.experiments import _pooled

    rng = np.random.default_rng(0)
    for n_old, n_new in [(1, 1), (2, 3), (5, 0), (0, 4), (1, 0)]:
        old, new = rng.normal(size=n_old), rng.normal(size=n_new)
        summary = _pooled(old) if n_old else None
        got = _pooled(new, summary, n_old)
        both = np.concatenate([old, new])
        assert got["mean"] == pytest.approx(both.mean())
        assert (got["std"] is None) if len(both) == 1 else got["std"] == pytest.approx(both.std(ddof=1))
