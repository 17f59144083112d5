"""Checkpoints of a continual run: everything needed to continue it bit for bit, and nothing that
can run code when it is loaded.

A checkpoint is a folder ``<output_dir>/checkpoints/checkpoint-<task>-<step>-<phase>/``, filled
under a temporary name and renamed (atomic). It holds:

- accelerate's ``save_state`` files: optimizer, LR scheduler, fp16 grad scaler and per-process
  RNG states (``torch.save`` files that ``load_state`` reads with ``weights_only=True``);
- ``model.safetensors``: what training changes in the model: every MultiLoRALinear's adapters,
  scaling, ranks and base weight/bias (merging methods edit the base weights), and the
  concept-token embedding rows of every text encoder;
- ``method.safetensors`` + ``method.json``: the method's own state (``Method.state_dict``: Fisher,
  merged τ, subspaces, FL2T's set module...), tensors and JSON values apart;
- ``rng.safetensors``: the run's data generator and torch's CPU/CUDA RNG states;
- ``run.json``: where the run is — ``task`` (0-based), ``step`` (optimizer steps done in that
  task) and ``phase`` ("train": inside the task; "done": trained, saved, merged and evaluated) —
  the evaluation matrices, the per-task log, and the run's fingerprint, checked on resume.

Before anything is loaded, every pickle-based file of the folder is opened with
``torch.load(weights_only=True)``; a file that needs more (a planted payload) is refused with a
one-line error and nothing in it runs. Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch

from fastcp.files import atomic_save_safetensors, atomic_write_json

#: arguments that decide the result and how it is measured (plus the method's own hyperparameters, see ``fingerprint``)
FINGERPRINT_ARGS = ("method", "rank", "lora_alpha", "lora_targets", "token_init", "learning_rate",
                    "token_learning_rate", "max_train_steps", "seed", "pretrained_model_name_or_path", "resolution", "center_crop", "random_flip",
                    "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2",
                    "adam_weight_decay", "adam_epsilon", "max_grad_norm", "snr_gamma", "noise_offset",
                    "with_prior_preservation", "prior_loss_weight", "num_class_images", "mixed_precision",
                    # the evaluation protocol: rows measured otherwise would not compare
                    "num_eval_images", "eval_inference_steps", "guidance_scale", "dc_timesteps", "dc_eval_images",
                    "clip_model", "dino_model", "eval_prompts")
#: MultiLoRALinear state entries indexed by adapter slot on dim 0 (grown by ``--extend_run`` for
#: methods with one slot per concept)
SLOT_KEYS = ("lora_a", "lora_b", "scaling", "ranks")
_NAME = re.compile(r"^checkpoint-(\d+)-(\d+)-(train|done)$")
_PICKLED = (".bin", ".pkl", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, unsafe, or from a different run)."""


def fingerprint(args, concepts, method) -> dict:
    """The arguments that decide a run's result: training flags, the method's hyperparameters and
    the concept sequence. Resuming with any of them changed is refused. The batch enters as the
    global batch (processes × accumulation × per-process batch): a run may resume on another
    number of GPUs with the same global batch and gives the same result."""
    fp = {k: getattr(args, k, None) for k in FINGERPRINT_ARGS}
    fp["global_batch_size"] = (int(args.train_batch_size) * int(getattr(args, "gradient_accumulation_steps", 1))
                               * int(getattr(args, "num_processes", 1)))
    fp["pretrained_model_name_or_path"] = str(fp["pretrained_model_name_or_path"])
    fp.update({f"hp.{k}": v for k, v in dataclasses.asdict(method.hp).items()})
    fp["concepts"] = [concept_identity(c) for c in concepts]
    # what the model starts from beyond the flags: --init_lora's content (not its path) and the Hub revision
    from fastcp.models.lora_init import init_lora_sha256

    fp["init_lora_sha256"] = init_lora_sha256(getattr(args, "init_lora", None))
    fp["revision"] = getattr(args, "revision", None)
    return json.loads(json.dumps(fp, default=str))


def concept_identity(concept) -> dict:
    """What makes a concept the same concept for a run: its name, token and prompt."""
    return {"name": concept.name, "token": concept.token, "prompt": concept.prompt}


def differing_keys(saved: dict, expected: dict, ignore=()) -> list[str]:
    return [k for k, v in expected.items() if k not in ignore and saved.get(k) != v]


# --------------------------------------------------------------------------- tensor trees
def split_tree(tree, prefix: str = ""):
    """(tensors {path: tensor}, skeleton): a nested dict/list of tensors and JSON values split into
    what safetensors holds and what JSON holds; tensors are replaced by {"__tensor__": path}."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        return obj

    return tensors, walk(tree, prefix)


def join_tree(skeleton, tensors: dict[str, torch.Tensor]):
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {k: join_tree(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tree(v, tensors) for v in skeleton]
    return skeleton


# --------------------------------------------------------------------------- model state
def model_state(backbone, layers) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in layers.items():
        for key, t in layer.state_dict().items():
            state[f"{name}.{key}"] = t.detach().clone()
    for e, (_, encoder) in enumerate(backbone.text_pairs()):
        table = encoder.get_input_embeddings().weight
        for tok in backbone.concept_tokens:
            state[f"token{e}::{tok}"] = table[backbone.concept_token_ids(tok)[e]].detach().clone()
    return state


@torch.no_grad()
def load_model_state(backbone, layers, state: dict[str, torch.Tensor]) -> None:
    """Put a ``model_state`` back. A state saved with fewer adapter slots or concept tokens (a
    finished run that ``--extend_run`` continues with more concepts) fills the first slots and
    the tokens it has; the rest keep their fresh, seeded initial values, which are those a run
    with every concept from the start would have (``ContinualTrainer.setup``)."""
    for name, layer in layers.items():
        own = layer.state_dict()
        for key, mine in own.items():
            saved = state[f"{name}.{key}"].to(mine.device, mine.dtype)
            if saved.shape == mine.shape:
                mine.copy_(saved)
            elif key in SLOT_KEYS and saved.shape[1:] == mine.shape[1:] and saved.shape[0] < mine.shape[0]:
                mine[: saved.shape[0]].copy_(saved)
            else:
                raise CheckpointError(f"model state: {name}.{key} has shape {list(saved.shape)}, "
                                      f"the model has {list(mine.shape)}")
    for e, (_, encoder) in enumerate(backbone.text_pairs()):
        table = encoder.get_input_embeddings().weight
        for tok in backbone.concept_tokens:
            if f"token{e}::{tok}" in state:
                table[backbone.concept_token_ids(tok)[e]] = state[f"token{e}::{tok}"].to(table)


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def load_rng_state(generator: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- save / find / load
def checkpoint_name(task: int, step: int, phase: str) -> str:
    return f"checkpoint-{task:03d}-{step:07d}-{phase}"


def save(accelerator, out_dir: str | Path, run: dict, model: dict, method: dict, rng: dict, keep: int = 2) -> Path:
    """Write one checkpoint folder (every process calls this: accelerate saves each process's RNG
    state; the main process writes the rest and renames the folder into place)."""
    folder = Path(out_dir) / "checkpoints"
    final = folder / checkpoint_name(run["task"], run["step"], run["phase"])
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        atomic_save_safetensors(model, tmp / "model.safetensors")
        tensors, skeleton = split_tree(method)
        atomic_save_safetensors(tensors, tmp / "method.safetensors")
        atomic_write_json(tmp / "method.json", skeleton)
        atomic_save_safetensors(rng, tmp / "rng.safetensors")
        atomic_write_json(tmp / "run.json", run)
        if final.exists():  # the same position saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)  # the folder appears whole or not at all
        for old in sorted(_checkpoints(folder))[:-keep]:
            shutil.rmtree(old[-1], ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _checkpoints(folder: Path):
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), int(m.group(2)), m.group(3) == "done", p))
    return out


def find(out_dir: str | Path, spec: str) -> Path:
    """``latest`` (the newest checkpoint of ``out_dir``) or an explicit checkpoint folder."""
    if spec == "latest":
        found = sorted(_checkpoints(Path(out_dir) / "checkpoints"))
        if not found:
            raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint in {Path(out_dir) / 'checkpoints'}")
        return found[-1][-1]
    path = Path(spec)
    if not (path / "run.json").is_file():
        raise CheckpointError(f"--resume_from_checkpoint: {path} is not a fastcp checkpoint folder")
    return path


def latest(out_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``out_dir``, or None."""
    found = sorted(_checkpoints(Path(out_dir) / "checkpoints"))
    return found[-1][-1] if found else None


def remove_all(out_dir: str | Path) -> None:
    """Delete every checkpoint of ``out_dir`` (a run started over with --overwrite_output_dir)."""
    for *_, path in _checkpoints(Path(out_dir) / "checkpoints"):
        shutil.rmtree(path, ignore_errors=True)


def latest_done(out_dir: str | Path) -> Path | None:
    """The newest checkpoint saved after a finished task (phase "done"), or None."""
    found = sorted(c for c in _checkpoints(Path(out_dir) / "checkpoints") if c[2])
    return found[-1][-1] if found else None


def read_run(path: Path) -> dict:
    """A checkpoint's run.json (position, matrices, fingerprint)."""
    try:
        return json.loads((path / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}") from exc


def refuse_unsafe_files(path: Path) -> None:
    """Open every pickle-based file of a checkpoint with ``torch.load(weights_only=True)`` (numpy
    RNG states allowed, as accelerate does); raise CheckpointError at the first one that needs
    arbitrary objects. Nothing in a refused file runs."""
    import warnings

    from accelerate.utils import load as safe_load

    for f in sorted(path.iterdir()):
        if f.suffix in _PICKLED:
            try:
                with warnings.catch_warnings():  # torch's notes about the file's pickle protocol
                    warnings.simplefilter("ignore")
                    safe_load(f, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"checkpoint {path}: {f.name} holds pickled objects that could run code "
                                      f"({type(exc).__name__}); refusing to load it") from None


def read_checked_run(path: Path, expected_fingerprint: dict, ignore=()) -> dict:
    """A checkpoint's run.json if its fingerprint is ``expected_fingerprint`` (but for the keys in
    ``ignore``, which the caller checks itself: ``--extend_run``'s concepts); else CheckpointError."""
    run = read_run(path)
    differs = differing_keys(run.get("fingerprint", {}), expected_fingerprint, ignore)
    if differs:
        raise CheckpointError(f"checkpoint {path} belongs to a different run (differs in {', '.join(differs)})")
    return run


def load(path: Path, expected_fingerprint: dict, ignore=()) -> dict:
    """run.json, model, method state and RNG states of a checkpoint, after the fingerprint
    (``read_checked_run``) and safety checks (accelerate's own files are loaded by
    ``accelerator.load_state``)."""
    from safetensors.torch import load_file

    run = read_checked_run(path, expected_fingerprint, ignore)
    refuse_unsafe_files(path)
    try:
        model = load_file(str(path / "model.safetensors"))
        method = join_tree(json.loads((path / "method.json").read_text()), load_file(str(path / "method.safetensors")))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None
    return {"run": run, "model": model, "method": method, "rng": rng}
