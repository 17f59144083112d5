"""``python -m fastcp.demo``: naive and one regularised method side by side (tiny settings)."""
import json

import pytest

from fastcp import demo


def test_demo_runs_both_methods_and_writes_the_figure_grids_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--output_dir", str(out), "--parallel", "yes", "--", "--max_concepts", "2", "--max_train_steps", "2",
                    "--train_batch_size", "2", "--num_eval_images", "2", "--eval_inference_steps", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[naive] task 2/2" in printed and "[merge] task 2/2" in printed  # both runs' lines, named
    for name in ("forgetting.png", "samples.png", "naive/results.json", "merge/results.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["naive", "merge"]
    for m, s in summary["methods"].items():
        r = json.loads((out / m / "results.json").read_text())["metrics"]["fidelity"]
        assert s["average"] == r["average"] and s["forgetting"] == r["forgetting"] and s["matrix"] == r["matrix"]
        assert "dc_acc" not in json.loads((out / m / "results.json").read_text())["metrics"]  # the demo measures none
        assert f"\n{m:<10}{s['learned']:>9.3f}{s['average']:>9.3f}{s['forgetting']:>12.3f}" in printed
    # a second demo into the same folder without --overwrite_output_dir refuses, and keeps the runs
    assert demo.main(["--output_dir", str(out), "--parallel", "no"]) != 0
    assert "already holds a finished run" in capsys.readouterr().out
    assert (out / "naive" / "results.json").exists()


def test_demo_bad_method_is_one_line(capsys):
    assert demo.main(["--method", "naive"]) == 2
    assert demo.main(["--method", "nope"]) == 2
    assert demo.main(["--", "--method", "merge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("fastcp.demo: error:") for e in err)


def test_forgetting_figure_and_summary_of_a_hand_case(tmp_path):
    from fastcp.eval.report import save_forgetting_figure

    s = {"naive": {"matrix": [[1.0, None], [0.25, 1.0]], "concepts": ["a", "b"]},
         "merge": {"matrix": [[1.0, None], [1.0, 0.5]], "concepts": ["a", "b"]}}
    results = {m: {"concepts": v["concepts"], "metrics": {"fidelity": {"matrix": v["matrix"], "average": 0.0,
                                                                     "forgetting": 0.0}}} for m, v in s.items()}
    summary = demo.summarize_runs(results)
    assert summary["naive"]["learned"] == 1.0 and summary["merge"]["learned"] == pytest.approx(0.75)
    table = demo.format_summary(summary).splitlines()
    assert table[2].split() == ["naive", "1.000", "0.000", "0.000", "0.250", "1.000"]
    save_forgetting_figure(summary, tmp_path / "f.png")
    from PIL import Image

    assert Image.open(tmp_path / "f.png").size[0] > Image.open(tmp_path / "f.png").size[1]  # panels side by side
