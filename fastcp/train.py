"""``python -m fastcp.train``: continual personalization of a text-to-image model, one concept at a time.

With only ``--output_dir`` it runs the embedded demo: the tiny pretrained model learns the
embedded synthetic concepts in order and is evaluated on every concept after every task.

Examples::

    python -m fastcp.train --output_dir out/demo
    python -m fastcp.train --output_dir out/mine --concepts my_sequence.json --method merge
    python -m fastcp.train --output_dir out/dirs --concepts_dir my_concepts/ --order_seed 3
    python -m fastcp.train --output_dir out/one --instance_data_dir dog/ --instance_prompt "a photo of <v1> dog"
    python -m fastcp.train --output_dir out/cd --concepts_list concepts_list.json \
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --init_lora my_lora/

Bad input (missing or empty folder, unreadable images, unknown method or backbone...) stops
before anything is written, with a one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULTS_NOTE = """defaults are tuned for the embedded tiny model on 2 CPU cores (the demo runs in minutes);
for Stable Diffusion use the usual dreambooth-LoRA values (e.g. --max_train_steps 500 --learning_rate 1e-4)."""


def build_parser() -> argparse.ArgumentParser:
    from fastcp.methods import METHODS
    from fastcp.methods.hparams import NATURAL, NONNEG, POS, POSINT, UNIT, add_method_arguments

    p = argparse.ArgumentParser(prog="python -m fastcp.train", description=__doc__.split("\n\n")[0],
                                epilog=DEFAULTS_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", default="tiny",
                   help="'tiny' (embedded, default), a diffusers pipeline directory (SD 1.x/2.x, SDXL), or a Hub "
                        "model id (org/name) already in the local Hugging Face cache (read offline, never downloaded)")
    g.add_argument("--revision", default=None,
                   help="revision (branch, tag or commit) of a Hub model id in the cache (default main)")
    g.add_argument("--concepts", "--concepts_list", type=Path, default=None,
                   help="task-sequence file (JSON or YAML): fastcp's entries, or diffusers' Custom Diffusion "
                        "concepts_list (instance_prompt/class_prompt/instance_data_dir/class_data_dir)")
    g.add_argument("--concepts_dir", type=Path, default=None, help="one sub-folder per concept, sorted order")
    g.add_argument("--order_seed", type=int, default=None, help="shuffle the --concepts_dir order with this seed")
    g.add_argument("--instance_data_dir", type=Path, default=None, help="a single concept's image folder")
    g.add_argument("--instance_prompt", default=None, help="prompt of --instance_data_dir, with its token")
    g.add_argument("--max_concepts", type=int, default=None, help="use only the first N concepts of the sequence")
    g.add_argument("--num_embedded_concepts", type=int, default=6,
                   help="concepts of the embedded sequence when no data is given (default 6, at most 8)")
    g.add_argument("--init_lora", type=Path, default=None,
                   help="start task 1's LoRA from this diffusers/peft file (pytorch_lora_weights.safetensors, or a "
                        "folder holding one; e.g. a fastcp task folder); its rank must be <= --rank")
    g = p.add_argument_group("method and training")
    g.add_argument("--method", default="naive", help=f"one of: {', '.join(sorted(METHODS))} (default naive)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default = rank, scale 1)")
    g.add_argument("--lora_targets", choices=["auto", "attn", "attn_ff"], default="auto",
                   help="LoRA on the attention projections (attn) or also on the feed-forward linears (attn_ff); "
                        "auto = attn_ff for the tiny model (its only attention runs at 8x8: too little capacity "
                        "for a new concept), attn otherwise")
    g.add_argument("--token_init", choices=["auto", "class", "random"], default="auto",
                   help="concept token starts from its class word's embedding (when it has one) or random (in every "
                        "text encoder); auto = the method's choice (random for clora, as C-LoRA; class otherwise)")
    g.add_argument("--learning_rate", type=float, default=2e-3,
                   help="LoRA learning rate (default 2e-3: tiny model, few hundred steps)")
    g.add_argument("--token_learning_rate", type=float, default=5e-3,
                   help="learning rate of each concept's token embedding (default 5e-3; 0 trains no token: it keeps its "
                        "initial embedding, as in the low-rank CP paper, which trains only the LoRA)")
    g.add_argument("--max_train_steps", type=int, default=400, help="optimizer steps per task (default 400)")
    g.add_argument("--train_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches of --train_batch_size per optimizer step (same result as one big batch)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="through accelerate: autocast the forward passes (weights stay fp32), fp16 with loss scaling; "
                        "default: accelerate's config (accelerate config / launch --mixed_precision), else no")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations in backward")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (needs bitsandbytes)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (needs xformers; PyTorch SDPA is the default)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("optimizer and schedule (diffusers' flags)")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"],
                   help="learning-rate schedule of each task (diffusers.optimization.get_scheduler; default constant)")
    g.add_argument("--lr_warmup_steps", type=NATURAL, default=0, help="warmup steps of each task's schedule")
    g.add_argument("--lr_num_cycles", type=POSINT, default=1, help="cosine_with_restarts: hard restarts")
    g.add_argument("--lr_power", type=POS, default=1.0, help="polynomial: power factor")
    g.add_argument("--adam_beta1", type=UNIT, default=0.9)
    g.add_argument("--adam_beta2", type=UNIT, default=0.999)
    g.add_argument("--adam_weight_decay", type=NONNEG, default=0.0,
                   help="AdamW weight decay of the LoRA parameters (default 0, fastcp's tuned value; diffusers uses "
                        "1e-2). Refused for methods that keep several adapter slots (it would decay the frozen ones); "
                        "tokens never decay")
    g.add_argument("--adam_epsilon", type=POS, default=1e-8)
    g.add_argument("--max_grad_norm", type=NONNEG, default=1.0, help="gradient clipping (0 = off; default 1.0)")
    g = p.add_argument_group("images and loss (diffusers' flags)")
    g.add_argument("--resolution", type=POSINT, default=None,
                   help="training image side in pixels (default: the model's sample size)")
    g.add_argument("--center_crop", action="store_true",
                   help="center-crop non-square images (default: a random square crop at every draw, as diffusers)")
    g.add_argument("--random_flip", action="store_true", help="flip each drawn image horizontally with probability 1/2")
    g.add_argument("--snr_gamma", type=POS, default=None,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the usual value; default off)")
    g.add_argument("--noise_offset", type=NONNEG, default=0.0, help="noise offset (e.g. 0.1; default 0 = off)")
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="DreamBooth prior preservation: add class images of each concept's class to its batches")
    g.add_argument("--class_data_dir", type=Path, default=None,
                   help="class images: this folder for a single concept, <dir>/<concept name>/ otherwise "
                        "(default <output_dir>/class_images/<name>); missing images are generated by the base model")
    g.add_argument("--class_prompt", default=None,
                   help="prompt of the class images (default: each concept's prior prompt, 'a photo of a <class word>')")
    g.add_argument("--num_class_images", type=POSINT, default=100, help="class images per concept (default 100)")
    g.add_argument("--prior_loss_weight", type=NONNEG, default=1.0, help="weight of the prior-preservation loss")
    add_method_arguments(p, METHODS)
    g = p.add_argument_group("evaluation")
    g.add_argument("--num_eval_images", type=int, default=8, help="generated images per concept for fidelity")
    g.add_argument("--eval_inference_steps", type=int, default=20, help="DDIM steps for evaluation samples")
    g.add_argument("--guidance_scale", type=float, default=3.0)
    g.add_argument("--dc_timesteps", type=int, default=8, help="timesteps per image for dc_acc")
    g.add_argument("--dc_eval_images", type=int, default=4, help="held-out images per concept for dc_acc (0 = do not measure dc_acc)")
    g.add_argument("--clip_model", type=Path, default=None,
                   help="a local CLIP directory (transformers save_pretrained): adds clip_i (generated vs the concept's "
                        "images) and clip_t (generated vs the prompt without its token); nothing is downloaded")
    g.add_argument("--dino_model", type=Path, default=None,
                   help="a local DINO / DINOv2 ViT directory: adds dino ([CLS] cosine, generated vs the concept's images)")
    g.add_argument("--eval_prompts", type=Path, default=None,
                   help="one prompt template per line with {} for the concept ('a {} on the beach' -> 'a <v1> dog on the "
                        "beach') for the CLIP/DINO images; default: a built-in contextual set (each concept's own prompt "
                        "on the tiny model)")
    g.add_argument("--forgetting_norm", choices=["t_minus_1", "t"], default="t_minus_1",
                   help="forgetting = summed drops / (T-1) (default: the concepts that can be forgotten) or / T "
                        "(as the low-rank CP paper's released code)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="save a resumable checkpoint every N steps inside a task and after every task")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (newest in --output_dir/checkpoints) or a checkpoint file")
    g.add_argument("--extend_run", action="store_true",
                   help="teach more concepts to the finished run in --output_dir: give a sequence whose first "
                        "concepts are the run's (e.g. a larger --max_concepts); only the new ones are trained, with "
                        "the run's method and flags (taken from its results.json), and the result is that of one "
                        "longer run")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", type=Path, required=True)
    g.add_argument("--report_to", choices=["none", "tensorboard", "wandb"], default="none",
                   help="through accelerate's trackers: loss, learning rate and metrics (tensorboard also samples) "
                        "under --output_dir/logs")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="allow writing into a directory that already holds a finished run")
    g.add_argument("--export_rank", type=POSINT, default=None,
                   help="besides the exact model in <output_dir>/model/ (rewritten after every task), write an "
                        "SVD-truncated LoRA of rank N of it (model/rank_N/, with its relative error per layer in "
                        "svd_error.json); for methods with one model (not separate/fl2t). Default: off")
    return p


def _fail(msg: str) -> int:
    print(f"fastcp.train: error: {msg}", file=sys.stderr)
    return 2


def load_sequence(args, size: int):
    """The task sequence from the arguments (embedded when none is given); validates everything."""
    from fastcp.data.concepts import (
        DataError, embedded_sequence, load_concepts_dir, load_image_folder, load_sequence_file, placeholder_token,
        Concept,
    )

    given = [x for x in (args.concepts, args.concepts_dir, args.instance_data_dir) if x is not None]
    if len(given) > 1:
        raise DataError("give only one of --concepts, --concepts_dir, --instance_data_dir")
    if args.concepts is not None:
        seq = load_sequence_file(args.concepts, size)
    elif args.concepts_dir is not None:
        seq = load_concepts_dir(args.concepts_dir, size, args.order_seed)
    elif args.instance_data_dir is not None:
        prompt = args.instance_prompt or "a photo of <v1> object"
        token = placeholder_token(prompt, "--instance_prompt")
        seq = [Concept(name=Path(args.instance_data_dir).name, token=token, prompt=prompt,
                       train_images=load_image_folder(args.instance_data_dir, size), source=str(args.instance_data_dir))]
    else:
        if args.pretrained_model_name_or_path != "tiny":
            raise DataError("the embedded concepts are for the tiny model: give --concepts, --concepts_dir or --instance_data_dir")
        seq = embedded_sequence(args.num_embedded_concepts, seed=args.seed, size=size)
    if args.max_concepts is not None:
        if args.max_concepts < 1:
            raise DataError(f"--max_concepts must be >= 1, got {args.max_concepts}")
        seq = seq[: args.max_concepts]
    return seq


#: flags that pick the task sequence: an extension takes them as given when it gives any of them
SEQUENCE_ARGS = ("concepts", "concepts_dir", "order_seed", "instance_data_dir", "instance_prompt", "max_concepts",
                 "num_embedded_concepts")
#: flags of the evaluation protocol: an extension's new rows must be measured like the run's
EVAL_ARGS = ("num_eval_images", "eval_inference_steps", "guidance_scale", "dc_timesteps", "dc_eval_images",
             "clip_model", "dino_model", "eval_prompts")
#: flags that belong to one invocation, never taken from the run
OWN_ARGS = ("output_dir", "extend_run", "resume_from_checkpoint", "overwrite_output_dir")


def given_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags written on the command line (defaults do not count)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def inherit_run_arguments(args, argv: list[str]) -> str | None:
    """``--extend_run``: every flag not written on the command line takes the run's value (from
    ``<output_dir>/results.json``), so ``--extend_run --max_concepts 3`` continues the run as it
    was launched. Returns a one-line problem, or None. The trainer then checks the fingerprint:
    an explicit flag that changes training (method, rank, LR, hyperparameters...) is refused."""
    out = Path(args.output_dir)
    try:
        saved = json.loads((out / "results.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return (f"--extend_run: {out} holds no finished run (results.json); to continue an interrupted run "
                f"use --resume_from_checkpoint latest")
    given = given_flags(argv)
    path_flags = {a.dest for a in build_parser()._actions if a.type is Path}
    for key, value in saved.items():
        if key in OWN_ARGS or key in given or not hasattr(args, key):
            continue
        if key in SEQUENCE_ARGS and given.intersection(SEQUENCE_ARGS):
            continue
        setattr(args, key, Path(value) if key in path_flags and value is not None else value)
    for key in sorted(given.intersection(EVAL_ARGS)):
        mine = getattr(args, key)
        if str(mine if mine is not None else None) != str(saved.get(key)):
            return (f"--extend_run: the run was evaluated with --{key} {saved[key]!r}, this call has "
                    f"{getattr(args, key)!r}; the new rows must be measured like the run's")
    return None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"fastcp.train: warning: {message}\n"


def make_args(**overrides) -> argparse.Namespace:
    """The Python API's arguments: the CLI's defaults, ``overrides`` (flag names without dashes),
    and the dependent defaults resolved as the CLI resolves them (``continual.resolve_defaults``).

        args = make_args(output_dir="out/run", method="merge", max_train_steps=100)
        run_continual(args, load_backbone("tiny"), embedded_sequence(3))
    """
    from fastcp.continual import resolve_defaults

    args = build_parser().parse_args(["--output_dir", str(overrides.pop("output_dir", "outputs/run"))])
    unknown = [k for k in overrides if not hasattr(args, k)]
    if unknown:
        raise ValueError(f"make_args: unknown argument(s) {', '.join(unknown)}")
    vars(args).update(overrides)
    return resolve_defaults(args)


def validate_args(args) -> str | None:
    """The first problem with the arguments as a one-line message, or None."""
    import importlib.util

    from fastcp.methods import METHODS, get_method
    from fastcp.methods.hparams import from_args

    if args.method not in METHODS:
        return f"unknown method {args.method!r}; choose one of {', '.join(sorted(m for m in METHODS if not m.startswith('_')))}"
    for name in ("rank", "max_train_steps", "train_batch_size", "num_eval_images", "dc_timesteps",
                 "checkpoints_total_limit", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.dc_eval_images < 0:
        return f"--dc_eval_images must be >= 0 (0 = no dc_acc), got {args.dc_eval_images}"
    for flag, module, extra in (("use_8bit_adam", "bitsandbytes", "pip install bitsandbytes"),
                                ("enable_xformers_memory_efficient_attention", "xformers", "pip install xformers"),
                                ("report_to", args.report_to, f"pip install {args.report_to}")):
        wanted = getattr(args, flag)
        if wanted and wanted != "none" and importlib.util.find_spec(module) is None:
            return f"--{flag} {'' if wanted is True else wanted + ' '}needs the {module} package, which is not installed ({extra})"
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        return f"--checkpointing_steps must be >= 1, got {args.checkpointing_steps}"
    if getattr(args, "export_rank", None) and get_method(args.method).export_form == "per_concept":
        return (f"--export_rank applies to methods with one model; {args.method} exports one exact adapter per "
                "concept (model/adapters/)")
    try:
        from_args(get_method(args.method).hyperparameters, args)
    except ValueError as exc:
        return str(exc)
    from fastcp.eval.features import FeatureModelError, check_model_dir
    from fastcp.eval.prompts import EvalPromptsError, load_eval_prompts

    try:
        if getattr(args, "clip_model", None):
            check_model_dir(args.clip_model, "--clip_model", "CLIP")
        if getattr(args, "dino_model", None):
            check_model_dir(args.dino_model, "--dino_model", "DINO ViT")
        if getattr(args, "eval_prompts", None):
            load_eval_prompts(args.eval_prompts)
    except (FeatureModelError, EvalPromptsError) as exc:
        return str(exc)
    return None


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # a skipped file is one line, not a source excerpt
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from fastcp.data.concepts import DataError

    # ---- validate everything before a single file is written
    if args.extend_run:
        if args.resume_from_checkpoint:
            return _fail("give --extend_run or --resume_from_checkpoint, not both "
                         "(--extend_run continues from the run's last finished task)")
        problem = inherit_run_arguments(args, argv)
        if problem:
            return _fail(problem)
    problem = validate_args(args)
    if problem:
        return _fail(problem)
    from fastcp.continual import resolve_defaults

    resolve_defaults(args)
    out = Path(args.output_dir)
    if (out / "results.json").exists() and not (args.overwrite_output_dir or args.extend_run):
        return _fail(f"{out} already holds a finished run (results.json); pass --overwrite_output_dir or pick another --output_dir")
    from fastcp.models import load_backbone
    from fastcp.models.lora_init import validate_init_lora

    try:
        backbone = load_backbone(args.pretrained_model_name_or_path, revision=args.revision)
        concepts = load_sequence(args, args.resolution or backbone.sample_size)
        validate_init_lora(args, backbone)
    except (DataError, ValueError) as exc:
        return _fail(str(exc))
    judge = None
    if backbone.name == "tiny":
        from fastcp.eval.judge import load_judge

        judge = load_judge()

    from fastcp.checkpoint import CheckpointError
    from fastcp.continual import ContinualTrainer, TrainingError

    t0 = time.time()
    trainer = ContinualTrainer(args, backbone, concepts, judge)
    try:
        trainer.setup()  # bad input found here (a checkpoint, mixed precision the device lacks...) is one line
    except (CheckpointError, ValueError) as exc:
        return _fail(str(exc).splitlines()[0])
    trainer.log(f"fastcp: {args.method} on {backbone.name} ({trainer.accelerator.device}, "
                f"{trainer.accelerator.num_processes} process(es)), {len(concepts)} concepts: "
                f"{', '.join(c.name for c in concepts)}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        for n in range(trainer.start_task, len(concepts)):
            losses = trainer.train_task(n)
            trainer.save_task(n)
            trainer.evaluate_task(n, losses)
        run = trainer.finish()
    except TrainingError as exc:
        return _fail(str(exc))
    if run.table:  # rank 0 (or the only process)
        print()
        print(run.table)
        print(f"\nfinished in {time.time() - t0:.0f}s; results in {out / 'results.json'}")
    return 0


def cli() -> int:
    """``python -m fastcp.train`` / ``fastcp-train``: one run, then the process group (if any) is
    taken down, as a process launched by torchrun/accelerate should before it exits."""
    rc = main()
    from accelerate.state import PartialState

    if PartialState._shared_state:
        PartialState().destroy_process_group()
    return rc


if __name__ == "__main__":
    raise SystemExit(cli())
