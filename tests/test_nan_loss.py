"""A non-finite loss stops the run with a one-line error; every finished task stays on disk."""
import pytest

from fastcp.continual import TrainingError, run_continual
from fastcp.data.concepts import embedded_sequence
from fastcp.methods.base import METHODS, register
from fastcp.methods.naive import Naive
from fastcp.models import load_backbone
from fastcp.train import build_parser


class NanOnSecondTask(Naive):
    name = "_test_nan_on_second_task"

    def loss(self, batch):
        terms = super().loss(batch)
        if batch.task == 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


@pytest.fixture
def nan_method():
    register(NanOnSecondTask)
    yield NanOnSecondTask.name
    METHODS.pop(NanOnSecondTask.name)


def test_nan_loss_stops_and_keeps_finished_tasks(tmp_path, nan_method):
    args = build_parser().parse_args(["--output_dir", str(tmp_path), "--method", nan_method, "--max_train_steps", "2",
                                      "--num_eval_images", "2", "--eval_inference_steps", "2", "--dc_timesteps", "2",
                                      "--dc_eval_images", "2", "--train_batch_size", "2"])
    args.lora_alpha, args.lora_targets = float(args.rank), "attn"
    concepts = embedded_sequence(2)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at task 2 .* the 1 finished task\(s\) are saved"):
        run_continual(args, load_backbone("tiny"), concepts)
    assert (tmp_path / "task_01_checker_star" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "task_02_striped_heart").exists()
    assert not (tmp_path / "results.json").exists()
