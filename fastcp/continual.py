"""The continual-personalization trainer: tasks in order, one method, evaluation after every task.

    trainer = ContinualTrainer(args, backbone, concepts, judge)
    trainer.setup()                       # accelerate, LoRA injection, tokens, method, resume
    for n in range(len(concepts)):
        trainer.train_task(n)             # the method's loss, optimizer steps on the global batch
        trainer.save_task(n)              # diffusers-loadable adapter + token embeddings
        trainer.evaluate_task(n)          # every learned concept (j <= n), every metric, split over processes
    trainer.finish()                      # results.json, heatmaps, sample grid

(``ContinualTrainer.run`` does exactly this; ``run_continual`` is the one-call form that
``python -m fastcp.train`` uses.)

accelerate's ``Accelerator`` owns the device (the GPU when there is one), mixed precision (bf16,
or fp16 with loss scaling), gradient accumulation, processes (``accelerate launch`` /
``torchrun``, one or many nodes: DDP) and the training state (``save_state``/``load_state``).
fastcp adds the global-batch rule that makes N processes train exactly like one process with
the N-times batch, for every method: each step's random draws are made once for the whole
global batch (``Method.draw_step``, same generator state in every process) and each process
(and accumulation micro-batch) takes its own contiguous slice; every loss term is this slice's
part of the global mean (``TaskBatch.share_of_mean``), so DDP's gradient mean is the gradient of
the one big batch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fastcp import checkpoint
from fastcp.eval import report
from fastcp.eval.metrics import METRICS, ContinualEvaluator
from fastcp.files import atomic_write_json, json_safe
from fastcp.methods import Context, get_method
from fastcp.methods.base import lora_weight_decay
from fastcp.models.lora_init import lora_target_names
from fastcp.nn import inject_multi_lora, routing_safe_checkpoint


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); finished tasks are already on disk."""


@dataclass
class RunResult:
    results: dict
    table: str
    output_dir: Path
    task_seconds: list[float] = field(default_factory=list)


def _peak_rss_gb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except (ImportError, OSError):  # not on Linux / macOS
        return None


def resolve_defaults(args, backbone_name: str | None = None):
    """Fill the arguments whose default depends on others, the same way for the CLI and the Python
    API (idempotent): ``--lora_alpha`` = rank, ``--lora_targets auto`` (attention + feed-forward on
    tiny, attention elsewhere), ``--token_init auto`` (the method's choice)."""
    if getattr(args, "lora_alpha", None) is None:
        args.lora_alpha = float(args.rank)
    name = str(backbone_name or getattr(args, "pretrained_model_name_or_path", "tiny"))
    if getattr(args, "lora_targets", "auto") == "auto":
        args.lora_targets = "attn_ff" if name == "tiny" else "attn"
    if getattr(args, "token_init", "auto") == "auto":
        args.token_init = get_method(args.method).token_init
    return args


def make_accelerator(args):
    """The run's Accelerator: ``--mixed_precision`` (None = accelerate's config), accumulation,
    trackers under ``<output_dir>/logs``, DDP without buffer broadcasts (the LoRA layers' buffers
    change only between tasks, identically everywhere)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    report_to = getattr(args, "report_to", "none")
    out = Path(args.output_dir)
    # Several processes and no GPU (CI, a CPU cluster): accelerate joins them over gloo only when
    # told to use the CPU; otherwise each would train alone.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    return Accelerator(
        cpu=cpu_processes,
        mixed_precision=getattr(args, "mixed_precision", None),
        gradient_accumulation_steps=int(getattr(args, "gradient_accumulation_steps", 1)),
        log_with=None if report_to in (None, "none") else report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def feature_scorers(args, backbone) -> dict:
    """The evaluator's CLIP/DINO scorers and evaluation prompts from ``--clip_model``,
    ``--dino_model`` and ``--eval_prompts`` (the contextual set on Stable Diffusion backbones,
    each concept's own prompt on the tiny model, whose vocabulary has no scenes)."""
    from fastcp.eval.prompts import CONTEXTUAL_PROMPTS, load_eval_prompts

    out = {"clip": None, "dino": None, "eval_prompts": None}
    if getattr(args, "clip_model", None) or getattr(args, "dino_model", None):
        from fastcp.eval.features import ClipScorer, DinoScorer

        if args.clip_model:
            out["clip"] = ClipScorer(args.clip_model, backbone.device)
        if args.dino_model:
            out["dino"] = DinoScorer(args.dino_model, backbone.device)
        if getattr(args, "eval_prompts", None):
            out["eval_prompts"] = load_eval_prompts(args.eval_prompts)
        elif backbone.name != "tiny":
            out["eval_prompts"] = CONTEXTUAL_PROMPTS
    return out


def make_optimizer(groups, args):
    """AdamW (or bitsandbytes' 8-bit AdamW with --use_8bit_adam) with diffusers' Adam flags; the
    weight decay of each group is the method's (0 for tokens, ``--adam_weight_decay`` for LoRA)."""
    kwargs = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def configure_backbone(bb, args) -> None:
    """Memory and precision options of the CLI that act on the backbone itself."""
    if getattr(args, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if getattr(args, "gradient_checkpointing", False):
        # the recomputation in backward must see the routing of the forward (fastcp.nn.checkpointing)
        bb.unet.enable_gradient_checkpointing(gradient_checkpointing_func=routing_safe_checkpoint)
    if getattr(args, "enable_xformers_memory_efficient_attention", False):
        bb.unet.enable_xformers_memory_efficient_attention()


def mean_learned(row: list[float], n: int) -> float:
    """Mean of row n over the concepts learned so far (j <= n; later ones are not measured)."""
    return sum(row[: n + 1]) / (n + 1)


@torch.no_grad()
def seed_adapter_slots(layers: dict, seed: int, alpha: float) -> None:
    """Re-draw every slot's initial A (Kaiming-uniform, B = 0) from a generator of (seed, slot):
    slot k starts the same however many slots there are, so a method with one slot per concept
    trains alike in a run extended later and in one longer run."""
    num_slots = next(iter(layers.values())).num_adapters
    for k in range(num_slots):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + 7 * k + 1)
            for layer in layers.values():
                layer.reset_adapter(k, rank=layer.rank, alpha=alpha)


def extension_problem(saved: dict, wanted: dict, done: int) -> None:
    """Raise CheckpointError (one line) unless the sequence ``wanted`` extends the run ``saved``
    (fingerprints): same training flags and hyperparameters, and the first ``done`` concepts the
    run's (same names, tokens and prompts), followed by at least one new concept."""
    differs = checkpoint.differing_keys(saved, wanted, ignore=("concepts",))
    if differs:
        k = differs[0]
        flag = k.replace("hp.", "")
        raise checkpoint.CheckpointError(
            f"--extend_run: the run was trained with --{flag} {saved.get(k)!r}, this call has {wanted[k]!r}; "
            f"an extended run keeps the run's method and hyperparameters ({len(differs)} difference(s))")
    old, new = saved["concepts"][:done], wanted["concepts"]
    for i, (o, c) in enumerate(zip(old, new)):
        if o != c:
            raise checkpoint.CheckpointError(
                f"--extend_run: concept {i + 1} of the sequence must be the run's {o['name']!r} ({o['token']}, "
                f"{o['prompt']!r}), got {c['name']!r} ({c['token']}, {c['prompt']!r})")
    if len(new) <= done:
        raise checkpoint.CheckpointError(
            f"--extend_run: the sequence has {len(new)} concept(s) and the run has trained {done}: "
            f"nothing to add (give a longer sequence, e.g. a larger --max_concepts)")


class _TrainStep(nn.Module):
    """What DDP wraps for one task: the UNet, the text encoders and the method's own trainable
    modules; forward = the method's loss. A fresh one per task, because DDP registers the
    parameters that require grad when it is built and each task trains different ones."""

    def __init__(self, backbone, method):
        super().__init__()
        self.unet = backbone.unet
        self.text_encoders = nn.ModuleList([enc for _, enc in backbone.text_pairs()])
        self.extra = nn.ModuleDict(method.trainable_modules())
        self.method = method

    def forward(self, batch):
        return self.method.loss(batch)


class ContinualTrainer:
    """Trains ``concepts`` in order with ``args.method`` and evaluates after every task.

    Writes into ``args.output_dir``: ``task_NN_<name>/pytorch_lora_weights.safetensors`` and
    ``learned_embeds.safetensors`` per task, ``model/`` (the personalized model after the last finished
    task as diffusers loads it, ``fastcp.models.export``), ``train_log.json`` (per task: seconds, losses,
    device, peak memory; updated after every task), ``samples_task_NN.png``, a checkpoint after
    every task (what ``--extend_run`` continues from; more inside tasks with
    ``--checkpointing_steps``), and at the end ``results.json``, ``<metric>_heatmap.png`` and
    ``samples.png``.
    """

    def __init__(self, args, backbone, concepts, judge=None, log=print):
        self.args = resolve_defaults(args, backbone.name)
        self.bb, self.concepts, self.judge, self._log = backbone, concepts, judge, log
        self.out = Path(args.output_dir)
        self.names = [c.name for c in concepts]
        self.log_rows: list[dict] = []
        self.task_seconds: list[float] = []
        self.start_task = 0
        self.resume: dict | None = None

    # ------------------------------------------------------------------ setup
    def log(self, *a, **k):
        if self.accelerator.is_main_process:
            self._log(*a, **k)

    def setup(self) -> None:
        from accelerate.utils import set_seed

        a, bb = self.args, self.bb
        self.accelerator = acc = make_accelerator(a)
        a.num_processes = acc.num_processes
        a.mixed_precision = acc.mixed_precision
        self.t_start = time.time()
        set_seed(a.seed)
        self.gen = torch.Generator().manual_seed(a.seed)
        self.method = get_method(a.method)(a)
        self.concepts = self.method.training_concepts(self.concepts)
        lora_weight_decay(a, self.method.slots_needed(len(self.concepts)))  # refuse before any work
        bb.to(acc.device)
        if getattr(a, "resolution", None) is None:
            a.resolution = bb.sample_size
        self.fingerprint = checkpoint.fingerprint(a, self.concepts, self.method)
        # which checkpoint to continue from, checked (fingerprint, sequence) before anything is written
        source = self._checkpoint_to_continue()
        if getattr(a, "with_prior_preservation", False):
            self._prepare_class_images()
        self.layers = inject_multi_lora(bb.unet, num_adapters=self.method.slots_needed(len(self.concepts)),
                                        rank=a.rank, alpha=a.lora_alpha, targets=lora_target_names(a, self.method))
        seed_adapter_slots(self.layers, a.seed, a.lora_alpha)
        for layer in self.layers.values():  # each task switches on what it trains (Method.begin_task)
            layer.lora_a.requires_grad_(False)
            layer.lora_b.requires_grad_(False)
        for k, c in enumerate(self.concepts):
            init = c.class_word if a.token_init == "class" else None
            # a token's random start depends on the seed and its position only, not on how many
            # concepts follow (so a run extended later equals one longer run)
            bb.add_concept_token(c.token, init_word=init, generator=torch.Generator().manual_seed(a.seed * 7919 + 31 + k))
        for _, encoder in bb.text_pairs():
            encoder.requires_grad_(False)
        configure_backbone(bb, a)
        self.method.setup(Context(backbone=bb, layers=self.layers, concepts=self.concepts, args=a, generator=self.gen))
        # Training's random streams start here, from the seed alone: whatever setup drew (slot
        # inits, new embedding rows) depends on the number of concepts; training must not.
        set_seed(a.seed)
        self.gen.manual_seed(a.seed)
        self.evaluator = ContinualEvaluator(
            bb, self.concepts, self.method, self.judge, num_images=a.num_eval_images,
            num_inference_steps=a.eval_inference_steps, guidance_scale=a.guidance_scale, dc_timesteps=a.dc_timesteps,
            dc_images=a.dc_eval_images, seed=a.seed, forgetting_norm=getattr(a, "forgetting_norm", "t_minus_1"),
            **feature_scorers(a, bb),
        )
        if acc.log_with:
            acc.init_trackers("fastcp", config={k: v for k, v in json_safe(vars(a)).items()
                                                if isinstance(v, (int, float, str, bool))})

        # accelerate's save_state/load_state would write and read the whole wrapped model (the
        # entire UNet); fastcp saves only what training changes (checkpoint.model_state).
        def skip_models_on_save(models, weights, output_dir):
            weights.clear()

        def skip_models_on_load(models, input_dir):
            models.clear()

        acc.register_save_state_pre_hook(skip_models_on_save)
        acc.register_load_state_pre_hook(skip_models_on_load)
        if source is not None:
            self._load_checkpoint(source, extend=bool(getattr(a, "extend_run", False)))
        elif getattr(self, "_stale_checkpoints", False) and acc.is_main_process:
            checkpoint.remove_all(self.out)  # --overwrite_output_dir: the old run's positions would mix with ours
        acc.wait_for_everyone()

    def _prepare_class_images(self) -> None:
        """Prior preservation: every concept's class images, generated by the base model (main
        process, before any LoRA exists) where the folder holds too few; loaded everywhere."""
        from fastcp.data.prior import class_image_dir, ensure_class_images, load_class_images

        a, acc = self.args, self.accelerator
        folders = [class_image_dir(c, getattr(a, "class_data_dir", None), self.out, len(self.concepts) == 1)
                   for c in self.concepts]
        if getattr(a, "class_prompt", None):
            for c in self.concepts:
                c.class_prompt_override = c.class_prompt_override or a.class_prompt
        if acc.is_main_process:
            for k, (c, folder) in enumerate(zip(self.concepts, folders)):
                ensure_class_images(self.bb, c.class_prompt, folder, a.num_class_images,
                                    num_inference_steps=a.eval_inference_steps, guidance_scale=a.guidance_scale,
                                    seed=a.seed * 1009 + k, log=self.log)
        acc.wait_for_everyone()
        self.class_pixels = [load_class_images(f, a.resolution, a.num_class_images) for f in folders]

    # ------------------------------------------------------------------ checkpoints
    def _snapshot(self, n: int, step: int, phase: str, losses=None) -> None:
        run = {"fingerprint": self.fingerprint, "task": n, "step": step, "phase": phase,
               "matrix": self.evaluator.matrix, "log_rows": self.log_rows, "task_seconds": self.task_seconds,
               "losses": losses or [], "elapsed": time.time() - self.t_start}
        checkpoint.save(self.accelerator, self.out, json_safe(run), checkpoint.model_state(self.bb, self.layers),
                        self.method.state_dict(), checkpoint.rng_state(self.gen),
                        keep=getattr(self.args, "checkpoints_total_limit", 2))

    def _checkpoint_to_continue(self) -> Path | None:
        """``--resume_from_checkpoint``: the given checkpoint of this very run. ``--extend_run``:
        the run's newest finished task, whose concepts must be the first of this sequence (the
        tasks after it are trained as they would be in one run of the whole sequence). Checks
        the fingerprint and the sequence; raises CheckpointError (one line)."""
        a = self.args
        if getattr(a, "extend_run", False):
            path = checkpoint.latest_done(self.out)
            if path is None:
                raise checkpoint.CheckpointError(f"--extend_run: {self.out} holds no finished task to extend "
                                                 f"(no checkpoints/checkpoint-*-done)")
            problem = self.method.extension_problem()
            if problem:
                raise checkpoint.CheckpointError(f"--extend_run: {problem}")
            run = checkpoint.read_run(path)
            extension_problem(run.get("fingerprint", {}), self.fingerprint, run["task"] + 1)
            return path
        if getattr(a, "resume_from_checkpoint", None):
            path = checkpoint.find(self.out, a.resume_from_checkpoint)
            checkpoint.read_checked_run(path, self.fingerprint)
            return path
        if checkpoint.latest(self.out) is not None:
            if not getattr(a, "overwrite_output_dir", False):
                raise checkpoint.CheckpointError(
                    f"{self.out} holds checkpoints of another run: pass --resume_from_checkpoint latest to continue it, "
                    f"--extend_run to add concepts to it, or --overwrite_output_dir to start over")
            self._stale_checkpoints = True  # removed once setup has succeeded
        return None

    def _load_checkpoint(self, path: Path, extend: bool = False) -> None:
        state = checkpoint.load(path, self.fingerprint, ignore=("concepts",) if extend else ())
        run = state["run"]
        for m, rows in run["matrix"].items():
            if m in self.evaluator.matrix:  # rows of the finished tasks (an extension adds columns)
                for n, row in enumerate(rows):
                    self.evaluator.matrix[m][n][: len(row)] = [math.nan if v is None else v for v in row]
        self.log_rows, self.task_seconds = run["log_rows"], run["task_seconds"]
        self.t_start -= run["elapsed"]
        # The method's state first: begin_task may depend on it (fl2t's set-start module).
        self.method.load_state_dict(state["method"])
        if run["phase"] == "done":
            checkpoint.load_model_state(self.bb, self.layers, state["model"])
            checkpoint.load_rng_state(self.gen, state["rng"])
            self.start_task = run["task"] + 1
        else:
            self.start_task = run["task"]
            self.resume = {**state, "path": path}
        step = run["step"] if run["phase"] == "train" else 0
        self.log(f"resuming from {path}: task {self.start_task + 1}, step {step}")

    # ------------------------------------------------------------------ one task
    def task_images(self, n: int):
        """(images, class images) per concept the method may see at task n (None elsewhere)."""
        from fastcp.data.images import TrainImages

        a = self.args
        seen = range(n + 1) if self.method.sees_all_concepts else [n]
        images, classes = [None] * (n + 1), None
        for k in seen:
            c = self.concepts[k]
            images[k] = TrainImages(self.bb, c.train_images, full=c.train_full, center_crop=a.center_crop,
                                    random_flip=a.random_flip)
        if getattr(a, "with_prior_preservation", False):
            classes = [None] * (n + 1)
            for k in seen:
                classes[k] = TrainImages(self.bb, self.class_pixels[k], random_flip=a.random_flip)
        return images, classes

    def _global_step_loss(self, step_loss: torch.Tensor, shards: int) -> float:
        """The step's loss over the whole global batch (sum of every shard's part / shards): the
        step's one host sync and one collective, so every process sees the same value and all stop
        together on a non-finite one."""
        if self.accelerator.num_processes > 1:
            step_loss = self.accelerator.reduce(step_loss, reduction="sum")
        return step_loss.item() / shards

    def train_task(self, n: int) -> list[float]:
        """Optimizer steps of task n; returns the per-step losses (global batch means)."""
        from diffusers.optimization import get_scheduler

        a, acc, bb, method = self.args, self.accelerator, self.bb, self.method
        concept = self.concepts[n]
        self._t_task = time.time()
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        bb.unet.train()
        groups = [g for g in method.begin_task(n) if g is not None]
        if n == 0 and self.resume is None and getattr(a, "init_lora", None) is not None:
            # --init_lora: task 1 starts from the file (after begin_task initialised the slot, before
            # the optimizer exists); a resume inside task 1 takes it from the checkpoint instead
            from fastcp.models.lora_io import load_lora_adapter

            load_lora_adapter(bb.unet, a.init_lora, slot=method.adapter_slot(0))
        P, accum = acc.num_processes, int(a.gradient_accumulation_steps)
        opt = make_optimizer(groups, a)
        # accelerate steps a prepared scheduler once per process per optimizer step, so the
        # schedule is stretched by P, as in diffusers' scripts: the LR at step k is the same for any P.
        sched = get_scheduler(a.lr_scheduler, optimizer=opt, num_warmup_steps=a.lr_warmup_steps * P,
                              num_training_steps=a.max_train_steps * P, num_cycles=a.lr_num_cycles, power=a.lr_power)
        model, opt, sched = acc.prepare(_TrainStep(bb, method), opt, sched)
        first_step, losses = 0, []
        if self.resume is not None:  # inside task n: model, optimizer, scheduler and position from the checkpoint
            r, self.resume = self.resume, None
            checkpoint.load_model_state(bb, self.layers, r["model"])
            method.load_state_dict(r["method"])  # again: begin_task re-initialised what the task trains
            acc.load_state(str(r["path"]))
            checkpoint.load_rng_state(self.gen, r["rng"])
            first_step, losses = r["run"]["step"], list(r["run"]["losses"])
        images, classes = self.task_images(n)
        params = [p for g in groups for p in g["params"]]
        every = getattr(a, "checkpointing_steps", None)
        bar = tqdm(range(first_step, a.max_train_steps), desc=f"task {n + 1}/{len(self.concepts)} {concept.name}",
                   leave=False, disable=None if acc.is_main_process else True)
        self._steps_timed = (time.time(), first_step)
        for step in bar:
            # --train_batch_size is per process and micro-batch: the global batch (P × accum × that)
            # and every draw of the step are made alike everywhere; each process and micro-batch
            # takes its own rows, so the result is that of one big batch.
            glob = method.draw_step(n, images, a.train_batch_size * P * accum, classes)
            step_loss = torch.zeros((), device=acc.device)
            for micro in range(accum):
                batch = glob.shard(acc.process_index * accum + micro, P * accum)
                with acc.accumulate(model):
                    terms = model(batch)
                    loss = terms["loss"]
                    step_loss += loss.detach()
                    if micro == accum - 1:  # before the update: a non-finite micro-batch makes the sum so
                        losses.append(self._global_step_loss(step_loss, P * accum))
                        if not math.isfinite(losses[-1]):
                            raise TrainingError(
                                f"non-finite loss ({losses[-1]}) at task {n + 1} ({concept.name}) step {step}; "
                                f"the {n} finished task(s) are saved in {self.out}")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        method.gradients_ready(acc)
                    if acc.sync_gradients and a.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, a.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
            if acc.log_with:
                acc.log({"train/loss": losses[-1], "train/lr": sched.get_last_lr()[-1]},
                        step=n * a.max_train_steps + step)
            if step % 10 == 0:
                bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()})
            if every and (step + 1) % every == 0 and step + 1 < a.max_train_steps:
                self._snapshot(n, step + 1, "train", losses)
        bar.close()
        t0, s0 = self._steps_timed
        self.seconds_per_step = (time.time() - t0) / max(1, a.max_train_steps - s0)
        method.release_hooks()
        for p in params:
            p.requires_grad_(False)
        acc.free_memory()  # this task's DDP wrapper, optimizer and scheduler
        del model, opt, sched
        return losses

    def save_task(self, n: int) -> Path:
        """Task n's adapter and token embedding (diffusers files), the method's end of task, then the
        personalized model after task n in ``RUN/model/`` (``fastcp.models.export``)."""
        from fastcp.models.export import export_model, task_dir as task_folder
        from fastcp.models.lora_io import save_concept_embeddings, save_lora_adapter

        concept = self.concepts[n]
        task_dir = task_folder(self.out, n, concept.name)
        if self.accelerator.is_main_process:
            save_lora_adapter(self.bb.unet, task_dir, slot=self.method.adapter_slot(n),
                              metadata={"fastcp_method": self.args.method, "fastcp_task": str(n + 1),
                                        "fastcp_concept": concept.name})
            save_concept_embeddings(self.bb, task_dir, [concept.token])
        self.method.end_task(n)
        if self.accelerator.is_main_process:  # the model after task n, as diffusers loads it: RUN/model/
            export_model(self.out, self.bb, self.method, self.concepts[: n + 1],
                         export_rank=getattr(self.args, "export_rank", None))
        return task_dir

    def evaluate_task(self, n: int, losses: list[float]) -> dict[str, list[float]]:
        """Row n of every matrix: each process evaluates its share of the concepts (j ≡ rank mod P),
        rank 0 gathers; a concept's numbers do not depend on which process computed them."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        train_s = time.time() - self._t_task
        t1 = time.time()
        mine = [j for j in range(n + 1) if j % acc.num_processes == acc.process_index]  # learned concepts only
        with acc.autocast():
            part = self.evaluator.evaluate_concepts(n, mine)
        merged: dict[int, dict] = {}
        for piece in (gather_object([part]) if acc.num_processes > 1 else [part]):
            merged.update(piece)
        row = self.evaluator.fill_row(n, merged)
        eval_s = time.time() - t1
        dev = acc.device
        self.task_seconds.append(train_s)
        self.log_rows.append({
            "task": n + 1, "concept": self.concepts[n].name, "train_seconds": round(train_s, 2),
            "eval_seconds": round(eval_s, 2), "seconds_per_step": self.seconds_per_step,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "device": str(dev),
            "num_processes": acc.num_processes, "threads": torch.get_num_threads(),
            "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
            # the process's peak resident memory so far (Linux: KiB); on the CPU, the peak of a run
            # started in its own process (``fastcp.experiments compare`` does)
            "peak_rss_gb": _peak_rss_gb(),
            "row": row})
        if acc.is_main_process:
            atomic_write_json(self.out / "train_log.json", {"method": self.args.method, "tasks": self.log_rows})
            report.save_sample_grid(self.evaluator.samples_for_grid(n), self.names, self.out / f"samples_task_{n + 1:02d}.png")
            if acc.log_with:
                acc.log({f"eval/{m}_mean": mean_learned(v, n) for m, v in row.items()}, step=(n + 1) * self.args.max_train_steps)
                self._log_samples(n)
        # Always: the state after a finished task is what --extend_run (and a resume after a
        # crash between tasks) continues from; without optimizer state it is small.
        self._snapshot(n, self.args.max_train_steps, "done")
        shown = "  ".join(f"{m}={mean_learned(v, n):.3f}" for m, v in row.items())
        self.log(f"task {n + 1}/{len(self.concepts)} {self.concepts[n].name}: train {train_s:.1f}s, eval {eval_s:.1f}s, "
                 f"mean over the {n + 1} learned concept(s): {shown}")
        return row

    def _log_samples(self, n: int) -> None:
        if "tensorboard" not in [t.name for t in self.accelerator.trackers]:
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for j, imgs in self.evaluator.last_samples.items():
            writer.add_images(f"samples/{self.names[j]}", (imgs.clamp(-1, 1) + 1) / 2, n + 1)
        writer.flush()

    def finish(self) -> RunResult:
        acc = self.accelerator
        summary = self.evaluator.summary()
        results = {}
        if acc.is_main_process:
            a = self.args
            results = {"method": a.method, "backbone": self.bb.name, "concepts": self.names, "seed": a.seed,
                       "seconds": time.time() - self.t_start, "metrics": summary, "config": json_safe(vars(a))}
            for m, s in summary.items():
                report.save_heatmap(s["matrix"], self.names, f"{a.method}: {m}", self.out / f"{m}_heatmap.png", METRICS[m])
            report.save_sample_grid(self.evaluator.samples_for_grid(), self.names, self.out / "samples.png")
            atomic_write_json(self.out / "results.json", results)
        acc.wait_for_everyone()
        for tracker in acc.trackers:  # not end_training(): that also takes the process group down,
            tracker.finish()          # and a process may run several trainings (experiments, tests)
        table = report.format_table(summary, self.names) if acc.is_main_process else ""
        return RunResult(results=results, table=table, output_dir=self.out, task_seconds=self.task_seconds)

    def run(self) -> RunResult:
        self.setup()
        for n in range(self.start_task, len(self.concepts)):
            losses = self.train_task(n)
            self.save_task(n)
            self.evaluate_task(n, losses)
        return self.finish()


def run_continual(args, backbone, concepts, judge=None, log=print) -> RunResult:
    """Train ``concepts`` in order with ``args.method`` and evaluate after every task (see
    ``ContinualTrainer``). ``args``: a Namespace from ``fastcp.train.make_args`` (or the CLI parser)."""
    return ContinualTrainer(args, backbone, concepts, judge, log).run()
