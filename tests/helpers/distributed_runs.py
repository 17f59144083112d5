"""Driver for tests/test_distributed.py: the same short runs, in whatever processes launched it
(``python`` alone, ``accelerate launch`` or ``torchrun``), each into <root>/<name>/.

    python tests/helpers/distributed_runs.py ROOT TRAIN_BATCH_SIZE NAME [NAME ...]
"""
import sys

from fastcp import train

# Adam divides each gradient by sqrt(v) + eps: where a gradient is ~0 by cancellation, the
# rounding noise of a different summation order (2 shards + all-reduce against one sum) is divided
# by eps and becomes an update of up to the learning rate. A larger eps keeps that amplification
# out of the comparison, which then measures the method's arithmetic, not Adam's.
COMMON = ["--max_concepts", "2", "--max_train_steps", "3", "--num_eval_images", "2", "--eval_inference_steps", "2",
          "--dc_timesteps", "2", "--dc_eval_images", "2", "--overwrite_output_dir", "--adam_epsilon", "1e-4"]
RUNS = {
    "naive": ["--method", "naive"],
    "merge": ["--method", "merge", "--lr_scheduler", "linear", "--lr_warmup_steps", "1"],  # schedule not stretched by P
    "ewc_dc": ["--method", "ewc_dc", "--dc_images", "2", "--fisher_images", "2", "--fisher_timesteps", "2"],
    "dsc": ["--method", "dsc", "--dc_images", "2"],
    "fl2t": ["--method", "fl2t", "--fl2t_set_size", "2"],
    # frozen weights (learning rates 0): every process evaluates the same model, so the evaluation
    # split over processes must give exactly the single-process matrices (3 concepts: an uneven split)
    "eval_split": ["--method", "naive", "--learning_rate", "0", "--token_learning_rate", "0", "--max_concepts", "3"],
}

if __name__ == "__main__":
    root, batch, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    for name in names:
        rc = train.main(["--output_dir", f"{root}/{name}", "--train_batch_size", batch, *COMMON, *RUNS[name]])
        if rc:
            raise SystemExit(rc)
