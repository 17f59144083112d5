"""The continual-personalization loop: tasks in order, one method, evaluation after every task.

    for n, concept in enumerate(sequence):
        params = method.begin_task(n)                 # what to train for concept n
        for step in range(max_train_steps):           # plain loop over the concept's images
            loss = method.loss(batch)["loss"]; step the optimizer
        save task n's adapter + token embedding       # diffusers-loadable files
        method.end_task(n)                            # merge / store / importance
        evaluator.evaluate_row(n)                     # every concept, every metric

``run_continual`` is what ``python -m fastcp.train`` calls; it can be used from Python directly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fastcp import checkpoint
from fastcp.eval import report
from fastcp.eval.metrics import METRICS, ContinualEvaluator
from fastcp.methods import Context, get_method
from fastcp.nn import FEEDFORWARD_TARGETS, inject_multi_lora, routing_safe_checkpoint


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); finished tasks are already on disk."""


@dataclass
class RunResult:
    results: dict
    table: str
    output_dir: Path
    task_seconds: list[float] = field(default_factory=list)


def _autocast(args, device):
    mp = getattr(args, "mixed_precision", "no")
    if mp == "no":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)


class DataParallel:
    """Plain data parallelism over torch.distributed, set up from the environment that
    ``torchrun`` / ``accelerate launch`` provide (WORLD_SIZE, RANK, MASTER_ADDR...).

    Every process holds the whole (small) trainable state, trains on its slice of the global
    batch and averages gradients with one all-reduce per parameter; only rank 0 evaluates and
    writes files. With WORLD_SIZE unset this is a no-op single process.
    """

    def __init__(self):
        import os

        import torch.distributed as dist

        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.owns_group = True
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0

    def all_finite(self, loss: torch.Tensor) -> bool:
        if self.world == 1:
            return bool(torch.isfinite(loss))
        flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
        self.dist.all_reduce(flag)
        return flag.item() == 0

    def average_gradients(self, params) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                self.dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            self.dist.destroy_process_group()


def make_optimizer(groups, args):
    """AdamW, or bitsandbytes' 8-bit AdamW with --use_8bit_adam."""
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.999))
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def configure_backbone(bb, args) -> None:
    """Memory and precision options of the CLI that act on the backbone itself."""
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if getattr(args, "gradient_checkpointing", False):
        bb.unet.enable_gradient_checkpointing(routing_safe_checkpoint(bb.unet))  # hot-path branch: recompute under the forward's routing
    if getattr(args, "enable_xformers_memory_efficient_attention", False):
        bb.unet.enable_xformers_memory_efficient_attention()


def run_continual(args, backbone, concepts, judge=None, log=print) -> RunResult:
    """Train ``concepts`` in order with ``args.method`` and evaluate after every task.

    Writes into ``args.output_dir``: ``task_NN_<name>/pytorch_lora_weights.safetensors`` and
    ``learned_embeds.safetensors`` per task, ``train_log.json`` (per-task seconds and losses,
    updated after every task), and at the end ``results.json``, ``<metric>_heatmap.png`` and
    ``samples.png``.
    """
    from fastcp.models.lora_io import save_concept_embeddings, save_lora_adapter

    out = Path(args.output_dir)
    dp = DataParallel()
    if not dp.main:
        log = lambda *a, **k: None  # noqa: E731  (one voice: rank 0)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    method = get_method(args.method)(args)
    bb = backbone
    targets = tuple(method.lora_targets)
    if getattr(args, "lora_targets", "attn") == "attn_ff":
        targets += FEEDFORWARD_TARGETS
    layers = inject_multi_lora(bb.unet, num_adapters=method.slots_needed(len(concepts)), rank=args.rank, alpha=args.lora_alpha,
                               targets=targets)
    for c in concepts:
        init = c.class_word if getattr(args, "token_init", "class") == "class" else None
        bb.add_concept_token(c.token, init_word=init, generator=gen)
    bb.text_encoder.requires_grad_(False)
    configure_backbone(bb, args)
    writer = None
    if dp.main and getattr(args, "report_to", "none") == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out / "logs"))
    ctx = Context(backbone=bb, layers=layers, concepts=concepts, args=args, generator=gen)
    method.setup(ctx)
    evaluator = ContinualEvaluator(
        bb, concepts, method, judge, num_images=args.num_eval_images, num_inference_steps=args.eval_inference_steps,
        guidance_scale=args.guidance_scale, dc_timesteps=args.dc_timesteps, dc_images=args.dc_eval_images,
        seed=args.seed,
    )
    names = [c.name for c in concepts]
    log_rows: list[dict] = []
    t_start = time.time()
    task_seconds = []
    fp = checkpoint.fingerprint(args, concepts)
    every = getattr(args, "checkpointing_steps", None)
    keep = getattr(args, "checkpoints_total_limit", 2)
    start_task, resume = 0, None
    if getattr(args, "resume_from_checkpoint", None):
        path = checkpoint.find(out, args.resume_from_checkpoint)
        resume = checkpoint.load(path, fp)
        checkpoint.load_model_state(bb, layers, resume["model"])
        method.load_state_dict(resume["method"])
        for m, rows in resume["matrix"].items():
            evaluator.matrix[m] = rows
        log_rows, task_seconds = resume["log_rows"], resume["task_seconds"]
        t_start -= resume["elapsed"]
        gen.set_state(resume["gen"])
        torch.set_rng_state(resume["torch_rng"])
        start_task = resume["task"] + (1 if resume["phase"] == "done" else 0)
        log(f"resuming from {path}: task {start_task + 1}, step {resume['step'] if resume['phase'] == 'train' else 0}")
        if resume["phase"] == "done":
            resume = None

    def snapshot(n, step, phase, opt=None, losses=None):
        return {"fingerprint": fp, "task": n, "step": step, "phase": phase, "model": checkpoint.model_state(bb, layers),
                "optimizer": opt.state_dict() if opt is not None else None, "method": method.state_dict(),
                "matrix": evaluator.matrix, "log_rows": log_rows, "task_seconds": task_seconds,
                "losses": losses or [], "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "elapsed": time.time() - t_start}

    for n, concept in enumerate(concepts):
        if n < start_task:
            continue
        t0 = time.time()
        bb.unet.train()
        groups = method.begin_task(n)
        opt = make_optimizer(groups, args)
        first_step, losses = 0, []
        if resume is not None:  # inside task n: optimizer, losses and position from the checkpoint
            opt.load_state_dict(resume["optimizer"])
            first_step, losses = resume["step"], list(resume["losses"])
            resume = None
        with torch.no_grad():
            # Earlier concepts' images exist only for references that may see them (joint).
            seen = concepts[: n + 1] if method.sees_all_concepts else [None] * n + [concept]
            latents = [None if c is None else bb.encode_images(c.train_images) for c in seen]
        bar = tqdm(range(first_step, args.max_train_steps), desc=f"task {n + 1}/{len(concepts)} {concept.name}",
                   leave=False, disable=None if dp.main else True)
        for step in bar:
            # --train_batch_size is per process and micro-batch: the global batch (world × accum ×
            # that) and its noise are drawn alike everywhere (same generator state); each process
            # and micro-batch takes its own rows, so the result is that of one big batch.
            accum = getattr(args, "gradient_accumulation_steps", 1)
            glob = method.sample_batch(n, latents, args.train_batch_size * dp.world * accum)
            glob = glob.with_noise(bb.scheduler, gen)
            opt.zero_grad(set_to_none=True)
            for micro in range(accum):
                batch = glob.shard(dp.rank * accum + micro, dp.world * accum)
                with _autocast(args, bb.device):
                    terms = method.loss(batch)
                loss = terms["loss"]
                if not dp.all_finite(loss.detach()):
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at task {n + 1} ({concept.name}) step {step}; "
                        f"the {n} finished task(s) are saved in {out}"
                    )
                (loss / accum).backward()
            params = [p for g in groups for p in g["params"]]
            dp.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if writer is not None:
                gstep = n * args.max_train_steps + step
                writer.add_scalar("train/loss", loss.item(), gstep)
                writer.add_scalar("train/lr", opt.param_groups[-1]["lr"], gstep)
            if step % 10 == 0:
                bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()})
            if dp.main and every and (step + 1) % every == 0 and step + 1 < args.max_train_steps:
                checkpoint.save(out, snapshot(n, step + 1, "train", opt, losses), keep)
        bar.close()
        method.release_hooks()
        for p in (p for g in groups for p in g["params"]):
            p.requires_grad_(False)
        task_dir = out / f"task_{n + 1:02d}_{concept.name}"
        if dp.main:
            save_lora_adapter(bb.unet, task_dir, slot=method.adapter_slot(n),
                              metadata={"fastcp_method": args.method, "fastcp_task": str(n + 1),
                                        "fastcp_concept": concept.name})
            save_concept_embeddings(bb, task_dir, [concept.token])
        method.end_task(n)
        train_s = time.time() - t0
        t1 = time.time()
        if not dp.main:  # the others wait while rank 0 evaluates and writes
            dp.barrier()
            continue
        row = evaluator.evaluate_row(n)
        eval_s = time.time() - t1
        task_seconds.append(train_s)
        log_rows.append({"task": n + 1, "concept": concept.name, "train_seconds": round(train_s, 2),
                         "eval_seconds": round(eval_s, 2), "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
                         "row": row})
        report.atomic_write_json(out / "train_log.json", {"method": args.method, "tasks": log_rows})
        if writer is not None:
            for metric, values in row.items():
                writer.add_scalar(f"eval/{metric}_mean", sum(values) / len(values), n + 1)
            for j, imgs in evaluator.last_samples.items():
                writer.add_images(f"samples/{names[j]}", (imgs.clamp(-1, 1) + 1) / 2, n + 1)
            writer.flush()
        if every:
            checkpoint.save(out, snapshot(n, args.max_train_steps, "done"), keep)
        dp.barrier()
        shown = "  ".join(f"{m}={sum(v) / len(v):.3f}" for m, v in row.items())
        log(f"task {n + 1}/{len(concepts)} {concept.name}: train {train_s:.1f}s, eval {eval_s:.1f}s, mean over concepts: {shown}")

    if not dp.main:
        dp.close()
        return RunResult(results={}, table="", output_dir=out, task_seconds=task_seconds)
    summary = evaluator.summary()
    results = {
        "method": args.method,
        "backbone": bb.name,
        "concepts": names,
        "seed": args.seed,
        "seconds": time.time() - t_start,
        "metrics": summary,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    for m, s in summary.items():
        report.save_heatmap(s["matrix"], names, f"{args.method}: {m}", out / f"{m}_heatmap.png", METRICS[m])
    report.save_sample_grid(evaluator.samples_for_grid(), names, out / "samples.png")
    report.atomic_write_json(out / "results.json", results)
    if writer is not None:
        writer.close()
    dp.close()
    return RunResult(results=results, table=report.format_table(summary, names), output_dir=out, task_seconds=task_seconds)

