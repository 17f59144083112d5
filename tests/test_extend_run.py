"""``--extend_run``: a finished run taught more concepts later ends exactly like one longer run
(matrices, adapters, the model state), and bad extensions are refused in one line, losing nothing."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastcp.checkpoint import latest_done
from fastcp.continual import ContinualTrainer
from fastcp.data.concepts import embedded_sequence
from fastcp.eval.judge import load_judge
from fastcp.models import load_backbone
from fastcp.train import make_args

CHEAP = dict(max_train_steps=3, train_batch_size=2, num_eval_images=2, eval_inference_steps=2, dc_timesteps=2,
             dc_eval_images=2)


def train(out: Path, method: str, num_concepts: int, **extra):
    args = make_args(output_dir=out, method=method, **CHEAP, **extra)
    trainer = ContinualTrainer(args, load_backbone("tiny"), embedded_sequence(num_concepts), load_judge(), log=lambda *a: None)
    return trainer.run()


def model_state(out: Path) -> dict:
    return load_file(str(latest_done(out) / "model.safetensors"))


def same(a, b, what, atol):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=f"{what}: {k}")


@pytest.mark.parametrize("method", ["merge", "magmax", "ewc_dc", "dsc", "fl2t"])
def test_extend_equals_one_longer_run(tmp_path, method):
    one, ext = tmp_path / "one", tmp_path / "ext"
    atol = 1e-6  # float noise only: every draw, slot and token start is the longer run's
    longer = train(one, method, 3)
    first = train(ext, method, 2)
    assert len(first.results["metrics"]["holdout_loss"]["matrix"]) == 2
    extended = train(ext, method, 3, extend_run=True)

    for metric, summary in longer.results["metrics"].items():
        got = extended.results["metrics"][metric]
        # NaN (a concept before its task) in the same places, the rest equal
        np.testing.assert_allclose(np.array(got["matrix"], float), np.array(summary["matrix"], float), rtol=0, atol=atol,
                                   err_msg=metric)
        for key in summary:
            if key != "matrix":
                assert got[key] == pytest.approx(summary[key], abs=atol), (metric, key)
    for task in sorted(p.name for p in one.glob("task_*")):
        for file in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
            same(load_file(str(one / task / file)), load_file(str(ext / task / file)), f"{task}/{file}", atol)
    same(model_state(one), model_state(ext), "model state after the last task", atol)
    exported = sorted(p.relative_to(one) for p in (one / "model").rglob("*.safetensors"))
    assert exported and exported == sorted(p.relative_to(ext) for p in (ext / "model").rglob("*.safetensors"))
    for rel in exported:  # the diffusers-loadable model after the extension is the longer run's
        same(load_file(str(one / rel)), load_file(str(ext / rel)), str(rel), atol)
    log = json.loads((ext / "train_log.json").read_text())["tasks"]
    assert [row["task"] for row in log] == [1, 2, 3]  # the run's rows kept, the new one added


def cli(out, *extra) -> tuple[int, str]:
    """``python -m fastcp.train`` in this process (a subprocess each would cost seconds of imports):
    (exit status, stderr)."""
    import contextlib
    import io

    from fastcp import train as train_cli

    flags = [f"--{k}={v}" for k, v in CHEAP.items()]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_cli.main(["--output_dir", str(out), *flags, *extra])
    return rc, err.getvalue()


def files_of(out: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_extend_cli_takes_the_run_flags_and_refuses_bad_extensions(tmp_path):
    from fastcp.data.concepts import export_embedded_sequence

    seq = Path(export_embedded_sequence(tmp_path / "data", num_concepts=3))
    entries = json.loads(seq.read_text())
    entries = entries["concepts"] if isinstance(entries, dict) else entries

    def sequence(name, picked):
        path = seq.parent / f"{name}.json"
        path.write_text(json.dumps([dict(entries[i], **change) for i, change in picked]))
        return str(path)

    out = tmp_path / "run"
    rc, err = cli(out, "--concepts", sequence("two", [(0, {}), (1, {})]), "--method", "merge", "--rank", "4")
    assert rc == 0, err[-2000:]
    before = files_of(out)

    def refused(*extra, says):
        rc, err = cli(out, "--extend_run", *extra)
        lines = [line for line in err.strip().splitlines() if "warning" not in line]
        assert rc == 2 and len(lines) == 1 and says in lines[0], err
        assert files_of(out) == before  # nothing lost, nothing added

    three = sequence("three", [(0, {}), (1, {}), (2, {})])
    refused("--concepts", three, "--method", "naive", says="trained with --method 'merge'")
    refused("--concepts", three, "--rank", "8", says="trained with --rank 4")
    refused("--concepts", three, "--num_eval_images", "4", says="evaluated with --num_eval_images 2")
    refused("--concepts", three, "--resume_from_checkpoint", "latest", says="not both")
    refused("--concepts", sequence("same", [(0, {}), (1, {})]), says="nothing to add")
    refused("--concepts", sequence("swapped", [(1, {}), (0, {}), (2, {})]), says="concept 1 of the sequence must be the run's")
    refused("--concepts", sequence("reused", [(0, {}), (1, {}), (2, {"token": entries[0]["token"]})]),
            says="is used by two concepts")
    rc, err = cli(tmp_path / "nothing", "--extend_run", "--concepts", three)
    assert rc == 2 and "holds no finished run" in err

    rc, err = cli(out, "--extend_run", "--concepts", three)  # method, rank... come from the run
    assert rc == 0, err[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "merge" and results["config"]["rank"] == 4 and len(results["concepts"]) == 3
    assert len(results["metrics"]["holdout_loss"]["matrix"]) == 3
    assert len(list(out.glob("task_0*"))) == 3
