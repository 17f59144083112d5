"""``python -m fastcp.train``: continual personalization of a text-to-image model, one concept at a time.

With only ``--output_dir`` it runs the embedded demo: the tiny pretrained model learns the
embedded synthetic concepts in order and is evaluated on every concept after every task.

Examples::

    python -m fastcp.train --output_dir out/demo
    python -m fastcp.train --output_dir out/mine --concepts my_sequence.json --method merge
    python -m fastcp.train --output_dir out/dirs --concepts_dir my_concepts/ --order_seed 3
    python -m fastcp.train --output_dir out/one --instance_data_dir dog/ --instance_prompt "a photo of <v1> dog"

Bad input (missing or empty folder, unreadable images, unknown method or backbone...) stops
before anything is written, with a one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULTS_NOTE = """defaults are tuned for the embedded tiny model on 2 CPU cores (the demo runs in minutes);
for Stable Diffusion use the usual dreambooth-LoRA values (e.g. --max_train_steps 500 --learning_rate 1e-4)."""


def build_parser() -> argparse.ArgumentParser:
    from fastcp.methods import METHODS

    p = argparse.ArgumentParser(prog="python -m fastcp.train", description=__doc__.split("\n\n")[0],
                                epilog=DEFAULTS_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", default="tiny",
                   help="'tiny' (embedded, default) or a diffusers pipeline directory (SD 1.x/2.x)")
    g.add_argument("--concepts", type=Path, default=None, help="task-sequence file (JSON or YAML)")
    g.add_argument("--concepts_dir", type=Path, default=None, help="one sub-folder per concept, sorted order")
    g.add_argument("--order_seed", type=int, default=None, help="shuffle the --concepts_dir order with this seed")
    g.add_argument("--instance_data_dir", type=Path, default=None, help="a single concept's image folder")
    g.add_argument("--instance_prompt", default=None, help="prompt of --instance_data_dir, with its token")
    g.add_argument("--max_concepts", type=int, default=None, help="use only the first N concepts of the sequence")
    g.add_argument("--num_embedded_concepts", type=int, default=6,
                   help="concepts of the embedded sequence when no data is given (default 6, at most 8)")
    g = p.add_argument_group("method and training")
    g.add_argument("--method", default="naive", help=f"one of: {', '.join(sorted(METHODS))} (default naive)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default = rank, scale 1)")
    g.add_argument("--lora_targets", choices=["auto", "attn", "attn_ff"], default="auto",
                   help="LoRA on the attention projections (attn) or also on the feed-forward linears (attn_ff); "
                        "auto = attn_ff for the tiny model (its only attention runs at 8x8: too little capacity "
                        "for a new concept), attn otherwise")
    g.add_argument("--token_init", choices=["class", "random"], default="class",
                   help="concept token starts from its class word's embedding (default, when it has one) or random")
    g.add_argument("--learning_rate", type=float, default=2e-3,
                   help="LoRA learning rate (default 2e-3: tiny model, few hundred steps)")
    g.add_argument("--token_learning_rate", type=float, default=5e-3,
                   help="learning rate of each concept's token embedding (default 5e-3)")
    g.add_argument("--max_train_steps", type=int, default=400, help="optimizer steps per task (default 400)")
    g.add_argument("--train_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches of --train_batch_size per optimizer step (same result as one big batch)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="autocast the forward passes (weights stay fp32)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations in backward")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (needs bitsandbytes)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (needs xformers; PyTorch SDPA is the default)")
    g.add_argument("--seed", type=int, default=0)
    add_method_hyperparameters(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--num_eval_images", type=int, default=8, help="generated images per concept for fidelity")
    g.add_argument("--eval_inference_steps", type=int, default=20, help="DDIM steps for evaluation samples")
    g.add_argument("--guidance_scale", type=float, default=3.0)
    g.add_argument("--dc_timesteps", type=int, default=8, help="timesteps per image for dc_acc")
    g.add_argument("--dc_eval_images", type=int, default=4, help="held-out images per concept for dc_acc")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="save a resumable checkpoint every N steps inside a task and after every task")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (newest in --output_dir/checkpoints) or a checkpoint file")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", type=Path, required=True)
    g.add_argument("--report_to", choices=["none", "tensorboard"], default="none",
                   help="tensorboard: loss, learning rate, metrics and samples under --output_dir/logs")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="allow writing into a directory that already holds a finished run")
    return p


def _typed(kind, ok, what):
    """argparse type: convert with ``kind`` and reject values failing ``ok`` (a one-line usage error)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return convert


_FRACTION = _typed(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
_NONNEG = _typed(float, lambda v: v >= 0, "a number >= 0")
_POS = _typed(float, lambda v: v > 0, "a number > 0")
_POSINT = _typed(int, lambda v: v >= 1, "an integer >= 1")
_NATURAL = _typed(int, lambda v: v >= 0, "an integer >= 0")


def add_method_hyperparameters(p: argparse.ArgumentParser) -> None:
    """Hyperparameters of the CP methods (DESIGN.md section 6); names follow the papers' symbols.
    Defaults were chosen on the embedded tiny sequence; the reason for each is in its help."""
    g = p.add_argument_group("method hyperparameters")
    g.add_argument("--mask_topk", type=_FRACTION, default=1.0,
                   help="magmax: keep only this top fraction of |tau_n| per layer before the max-magnitude merge "
                        "(default 1.0 = plain MagMax; the selective update of Deja et al. uses e.g. 0.1)")
    g.add_argument("--clora_lambda", type=_NONNEG, default=100.0,
                   help="clora: lambda of ||abs(dW_<n) * dW_n||_F^2 (default 100: on the tiny sequence with "
                        "--clora_targets lora, 1e3 blocked every concept after the first (fidelity 0 on tasks 2-3, "
                        "3 seeds); 100 and 10 both learned task 2 and kept task 1 (seed 0); 100 regularises more)")
    g.add_argument("--clora_targets", choices=["cross_kv", "lora"], default="cross_kv",
                   help="clora: train and penalise only the cross-attention K/V adapters (default, C-LoRA's "
                        "choice) or every layer --lora_targets selects (on the tiny model, whose cross-attention "
                        "runs only at 8x8, K/V alone cannot learn a concept in a few hundred steps)")
    g.add_argument("--dc_temperature", type=_POS, default=0.1,
                   help="ewc_dc/dsc: DC temperature tau of softmax(-mean_t err / tau) (default 0.1: error gaps "
                        "between concepts are ~3e-3..6e-2 on the tiny model; tau=1 gives flat scores, tau=0.01 "
                        "saturates p(c_n|x) within tens of steps (CE ~1e-8), which also zeroes the Fisher)")
    g.add_argument("--dc_delta", type=_NONNEG, default=0.001,
                   help="ewc_dc/dsc: delta, weight of CE(DC logits, c_n) (default 0.001: the CE can always be lowered "
                        "by raising the other candidates' errors on D_n, which wrecks the shared weights; on tiny, "
                        "delta=0.1 raised the held-out loss after task 1 from 0.11 to 0.24 (0.66 by task 3), "
                        "delta=0.01 still forgot concept 1's fidelity fully, 0.001 kept holdout loss at naive's level)")
    g.add_argument("--dc_concepts", type=_POSINT, default=5,
                   help="ewc_dc/dsc: DC candidates per step incl. c_0 and c_n (default 5: all seen concepts up to "
                        "a cap that bounds the per-step cost)")
    g.add_argument("--dc_train_timesteps", type=_POSINT, default=2,
                   help="ewc_dc/dsc: DC timesteps per step (default 2: a fresh draw every step averages out)")
    g.add_argument("--dc_images", type=_POSINT, default=4,
                   help="ewc_dc/dsc: batch images that get DC terms per step (default 4 = half the batch: the DC "
                        "pass has images x concepts x timesteps rows)")
    g.add_argument("--ewc_lambda", type=_NONNEG, default=1e4,
                   help="ewc_dc/dsc_ewc: lambda of (lambda/2) sum F (dW_n)^2 (default 1e4: on tiny with tau=0.1 the "
                        "sum F (dW_n)^2 of an unregularised task is ~1e-5, so the penalty reaches L_diff's ~0.06)")
    g.add_argument("--ewc_gamma", type=_typed(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), default=1.0,
                   help="ewc_dc/dsc_ewc: decay gamma of F <- gamma F + F_n (default 1: every earlier concept "
                        "counts fully, the CP goal; < 1 favours recent concepts)")
    g.add_argument("--fisher_timesteps", type=_POSINT, default=4,
                   help="ewc_dc: timesteps (evenly spaced) per image for the Fisher (default 4)")
    g.add_argument("--fisher_images", type=_POSINT, default=8,
                   help="ewc_dc: training images per task for the Fisher (default 8 = all of an embedded concept)")
    g.add_argument("--dsc_alpha", type=_NONNEG, default=1.0,
                   help="dsc: alpha, weight of KL(p_old || p_new) over old concepts (default 1: same order as CE)")
    g.add_argument("--dsc_beta", type=_NONNEG, default=1.0,
                   help="dsc: beta, weight of mean ||eps_new - eps_old||^2 over old concepts (default 1: the "
                        "scale of L_diff, i.e. old prompts' predictions weigh as much as the new concept's loss)")
    g.add_argument("--fl2t_set_size", type=_NATURAL, default=1,
                   help="fl2t: concepts learned concurrently per set (default 1 = each task a set, strictly "
                        "continual; 0 = the whole sequence is one set, the paper's concurrent setting)")
    g.add_argument("--fl2t_proxy_dim", type=_POSINT, default=64, help="fl2t: width d of proxies in the set module (default 64)")
    g.add_argument("--fl2t_heads", type=_POSINT, default=4, help="fl2t: attention heads of the set module (default 4)")
    g.add_argument("--fl2t_layers", type=_POSINT, default=1, help="fl2t: encoder layers of the set module (default 1)")
    g.add_argument("--fl2t_tau", type=_POS, default=0.1, help="fl2t: InfoNCE temperature tau_c (default 0.1, CLIP-like)")
    g.add_argument("--fl2t_nce_weight", type=_NONNEG, default=0.1,
                   help="fl2t: weight of the InfoNCE term (default 0.1: O(1) loss kept below L_diff's influence)")
    g.add_argument("--fl2t_keep_weight", type=_NONNEG, default=10.0,
                   help="fl2t: weight of the routing-keep term, the mean squared change of earlier sets' "
                        "per-layer coef (text only, no earlier images). Default 10: without it (0) the shared "
                        "set module learns to switch earlier adapters into old prompts while fitting a new set "
                        "(fidelity of earlier concepts fell from 1.0 to 0-0.25 in one of 3 seeds); 10 makes a "
                        "gate drift of 0.15 cost about L_diff")
    g.add_argument("--fl2t_gate_scale", type=float, default=1.0, help="fl2t: initial a_l of g = sigmoid(a_l s + c_l)")
    g.add_argument("--fl2t_gate_bias", type=float, default=-2.0,
                   help="fl2t: initial c_l (default -2: other concepts' adapters start mostly off, g ~ 0.12)")
    g.add_argument("--fl2t_learning_rate", type=_POS, default=1e-3,
                   help="fl2t: learning rate of the proxies and the set module (default 1e-3)")


def _fail(msg: str) -> int:
    print(f"fastcp.train: error: {msg}", file=sys.stderr)
    return 2


def load_sequence(args, size: int):
    """The task sequence from the arguments (embedded when none is given); validates everything."""
    from fastcp.data.concepts import (
        DataError, embedded_sequence, load_concepts_dir, load_image_folder, load_sequence_file, Concept,
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
        token = next((w for w in prompt.split() if w.startswith("<") and w.endswith(">")), None)
        if token is None:
            raise DataError(f"--instance_prompt {prompt!r} has no placeholder token like <v1>")
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"fastcp.train: warning: {message}\n"


def main(argv=None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # a skipped file is one line, not a source excerpt
    parser = build_parser()
    args = parser.parse_args(argv)
    from fastcp.data.concepts import DataError
    from fastcp.methods import METHODS

    # ---- validate everything before a single file is written
    if args.method not in METHODS:
        return _fail(f"unknown method {args.method!r}; choose one of {', '.join(sorted(METHODS))}")
    for name in ("rank", "max_train_steps", "train_batch_size", "num_eval_images", "dc_timesteps", "dc_eval_images",
                 "checkpoints_total_limit", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            return _fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    import importlib.util

    for flag, module, extra in (("use_8bit_adam", "bitsandbytes", "pip install bitsandbytes"),
                                ("enable_xformers_memory_efficient_attention", "xformers", "pip install xformers"),
                                ("report_to", "tensorboard", "pip install tensorboard")):
        wanted = getattr(args, flag)
        if wanted and wanted != "none" and importlib.util.find_spec(module) is None:
            return _fail(f"--{flag} needs the {module} package, which is not installed ({extra})")
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        return _fail(f"--checkpointing_steps must be >= 1, got {args.checkpointing_steps}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.lora_targets == "auto":
        args.lora_targets = "attn_ff" if args.pretrained_model_name_or_path == "tiny" else "attn"
    out = Path(args.output_dir)
    if (out / "results.json").exists() and not args.overwrite_output_dir:
        return _fail(f"{out} already holds a finished run (results.json); pass --overwrite_output_dir or pick another --output_dir")
    from fastcp.models import load_backbone

    try:
        backbone = load_backbone(args.pretrained_model_name_or_path)
        concepts = load_sequence(args, backbone.sample_size)
    except (DataError, ValueError) as exc:
        return _fail(str(exc))
    judge = None
    if backbone.name == "tiny":
        from fastcp.eval.judge import load_judge

        judge = load_judge()

    from fastcp.checkpoint import CheckpointError
    from fastcp.continual import TrainingError, run_continual

    t0 = time.time()
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"fastcp: {args.method} on {backbone.name}, {len(concepts)} concepts: {', '.join(c.name for c in concepts)}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        run = run_continual(args, backbone, concepts, judge)
    except (TrainingError, CheckpointError) as exc:
        return _fail(str(exc))
    if run.table:  # rank 0 (or the only process)
        print()
        print(run.table)
        print(f"\nfinished in {time.time() - t0:.0f}s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
