"""Checkpoints of a continual run: everything needed to continue it bit for bit.

A checkpoint is one file ``<output_dir>/checkpoints/checkpoint-<task>-<step>.pt`` written
atomically (temporary file + ``os.replace``). It holds:

- where the run is: ``task`` (0-based) and ``step`` (optimizer steps done in that task), and
  ``phase`` = "train" (inside the task) or "done" (task trained, saved, merged and evaluated);
- the model state that training changes: every MultiLoRALinear's adapters, scaling, ranks and
  base weight/bias (merging methods edit the base weights), and the concept-token embedding rows;
- the optimizer state (phase "train"), the method's own state (``Method.state_dict``), the data
  generator and torch RNG states, the evaluation matrices and the per-task log so far;
- a fingerprint of the arguments that decide the result, checked on resume.

Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

FINGERPRINT_ARGS = ("method", "rank", "lora_alpha", "lora_targets", "clora_targets", "token_init",
                    "learning_rate", "token_learning_rate", "max_train_steps", "train_batch_size", "seed",
                    "pretrained_model_name_or_path")
_NAME = re.compile(r"checkpoint-(\d+)-(\d+)-(train|done)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or from a different run)."""


def fingerprint(args, concepts) -> dict:
    fp = {k: getattr(args, k, None) for k in FINGERPRINT_ARGS}
    fp["pretrained_model_name_or_path"] = str(fp["pretrained_model_name_or_path"])
    fp["concepts"] = [c.name for c in concepts]
    return fp


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
    for name, layer in layers.items():
        own = layer.state_dict()
        layer.load_state_dict({k: state[f"{name}.{k}"] for k in own})
    for e, (_, encoder) in enumerate(backbone.text_pairs()):
        table = encoder.get_input_embeddings().weight
        for tok in backbone.concept_tokens:
            table[backbone.concept_token_ids(tok)[e]] = state[f"token{e}::{tok}"]


def save(out_dir: str | Path, state: dict, keep: int = 2) -> Path:
    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{state['task']:03d}-{state['step']:07d}-{state['phase']}.pt"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for old in sorted(_checkpoints(folder))[:-keep]:
        old[-1].unlink(missing_ok=True)
    return path


def _checkpoints(folder: Path):
    out = []
    for p in folder.glob("checkpoint-*.pt"):
        m = _NAME.search(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), m.group(3) == "done", p))
    return out


def find(out_dir: str | Path, spec: str) -> Path:
    """``latest`` (the newest checkpoint of ``out_dir``) or an explicit file path."""
    if spec == "latest":
        found = sorted(_checkpoints(Path(out_dir) / "checkpoints"))
        if not found:
            raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint in {Path(out_dir) / 'checkpoints'}")
        return found[-1][-1]
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(f"--resume_from_checkpoint: {path} does not exist")
    return path


def load(path: Path, expected_fingerprint: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}") from exc
    differs = [k for k, v in expected_fingerprint.items() if state.get("fingerprint", {}).get(k) != v]
    if differs:
        raise CheckpointError(f"checkpoint {path} belongs to a different run (differs in {', '.join(differs)})")
    return state
