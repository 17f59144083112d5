"""``python -m fastcp.generate``: images from a personalized model (``RUN/model/``), a batch of
mixed concepts in one pass.

    python -m fastcp.generate --run out/demo --output_dir samples          # every concept's own prompt
    python -m fastcp.generate --run out/demo --prompt "a photo of <v1> star" --prompt "a photo of <v2> heart" \\
        --num_images 4 --seed 0 --output_dir samples
    python -m fastcp.generate --run out/demo/model --prompt_file prompts.txt --output_dir samples

It reads only the exported folder (``fastcp.models.export``), never a checkpoint: the base model
(``load_backbone`` of the index's ``base_model``, or ``--base_model``), every concept's embeddings
(``lora_io.load_concept_embeddings``) and the LoRA files:

- a single-model method (naive, merge, ortho, magmax, clora, ewc_dc, dsc, joint): the one exact
  LoRA is folded into the targeted weights once (W = W0 + B A, fp32 accumulation), so sampling
  costs what the base model costs;
- a method with one adapter per concept (separate, fl2t): concept k's adapter goes into slot k of
  ``MultiLoRALinear`` layers, and each sample of a batch is routed to its concept's slot through
  the fused op in ONE batched pass (``lora_routing(adapter_ids=...)``: the S-LoRA/Punica serving
  case for diffusion). A prompt's concept is the concept token it contains; a prompt without one
  runs the base model (id −1). Classifier-free guidance's unconditional row of a sample is routed
  to the same adapter as the sample (the UNet batch is [uncond; cond], ids = [ids; ids]), so
  guidance contrasts the concept's model with itself, as diffusers' ``set_adapters`` does.

Image k of every prompt starts from the noise of seed ``--seed + k`` (drawn per sample, on the
CPU), so a sample does not depend on the batch it is in, and a column of the grid compares the
prompts on the same noise. Files: ``<output_dir>/<prompt index>_<prompt slug>_<k>.png``,
``grid.png`` (a row per prompt) and ``images.json`` (prompt, concept, seed and file of each image).

Bad input (no exported model, a missing prompt file, an unknown ``<token>``, a prompt naming two
concepts of a one-adapter-per-concept model) is one line ``fastcp.generate: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastcp.files import atomic_write_json, atomic_write_png, images_to_uint8

#: a word that looks like a placeholder token (``<v1>``, ``<my-dog>``): unknown ones are refused
TOKEN_LIKE = re.compile(r"<[^<>\s]+>")


def _mentions(prompt: str, token: str) -> bool:
    """``token`` occurs in ``prompt`` as a whole word (``<v1>`` is not in ``<v10>``, ``sks`` not in ``sksx``)."""
    return re.search(rf"(?<![\w<]){re.escape(token)}(?![\w>])", prompt) is not None


@dataclass
class PersonalizedModel:
    """A base model with an exported fastcp model loaded (``load_model``).

    single: the LoRA is folded into the base weights (one model for every prompt); otherwise
    ``slots[token]`` is the adapter slot of each concept's token.
    """

    backbone: object
    index: dict
    folder: Path
    single: bool
    slots: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        return [c["token"] for c in self.index["concepts"]]

    def adapter_ids(self, prompts: list[str]) -> torch.Tensor:
        """[P] long: each prompt's adapter slot (−1 = base model: no concept token, or a single
        model, where every prompt runs the one model). ValueError (one line) for a ``<token>``
        the model does not know, or a prompt naming two concepts of a per-concept model."""
        ids = []
        for p in prompts:
            unknown = [t for t in TOKEN_LIKE.findall(p) if t not in self.tokens]
            if unknown:
                raise ValueError(f"prompt {p!r}: unknown concept token {unknown[0]}; this model knows "
                                 f"{', '.join(self.tokens)}")
            found = [t for t in self.tokens if _mentions(p, t)]
            if len(found) > 1 and not self.single:
                raise ValueError(f"prompt {p!r} names {len(found)} concepts ({', '.join(found)}); the "
                                 f"{self.index['method']} model keeps one adapter per concept, so a prompt can use one")
            ids.append(-1 if self.single or not found else self.slots[found[0]])
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, num_images: int = 1, seed: int = 0, guidance_scale: float = 3.0,
                 num_inference_steps: int = 25, batch_size: int = 16) -> torch.Tensor:
        """Images [P · num_images, 3, H, W] in [-1, 1], prompt-major (image k of prompt p at
        p · num_images + k), image k of every prompt from the noise of seed ``seed + k``.
        Batches of ``batch_size`` samples mix concepts freely: one routed UNet pass each."""
        from fastcp.nn import lora_routing

        if not prompts:
            raise ValueError("prompts: give at least one prompt")
        if num_images < 1 or batch_size < 1:
            raise ValueError(f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}")
        bb = self.backbone
        ids = self.adapter_ids(prompts).repeat_interleave(num_images)
        flat = [p for p in prompts for _ in range(num_images)]
        noise = torch.stack([torch.randn(bb.latent_shape, generator=torch.Generator().manual_seed(seed + k))
                             for k in range(num_images)])
        latents = noise.repeat(len(prompts), 1, 1, 1)
        out = []
        for start in range(0, len(flat), batch_size):
            chunk, cids = flat[start : start + batch_size], ids[start : start + batch_size].to(bb.device)
            if self.single:
                images = bb.generate(chunk, num_inference_steps, guidance_scale, batch_size=len(chunk),
                                     latents=latents[start : start + batch_size])
            else:
                # one plan for every UNet call of the chunk: rows [uncond; cond] of sample b share its adapter
                with lora_routing(bb.unet, adapter_ids=torch.cat([cids, cids])):
                    images = bb.generate(chunk, num_inference_steps, guidance_scale, batch_size=len(chunk),
                                         latents=latents[start : start + batch_size])
            out.append(images)
        return torch.cat(out)


def load_model(path, *, base_model: str | None = None, device=None, dtype=torch.float32) -> PersonalizedModel:
    """Load an exported model (a run folder or its ``model/``) onto its base model.

    ValueError (one line) for a missing or malformed folder, a missing file, or LoRA files that do
    not fit the base model.
    """
    from fastcp.models import load_backbone
    from fastcp.models.export import read_index
    from fastcp.models.lora_io import load_concept_embeddings, load_lora_adapter, read_lora_file
    from fastcp.nn import inject_multi_lora

    folder, index = read_index(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bb = load_backbone(base_model or index["base_model"], device=device, dtype=dtype)
    concepts = index["concepts"]
    for c in concepts:
        load_concept_embeddings(bb, folder / c["embeddings"])
    if index["single_model"]:
        factors, scales, _ = read_lora_file(folder / index["lora"]["file"])
        _fold_into_weights(bb.unet, factors, scales, folder)
        return PersonalizedModel(bb, index, folder, single=True)
    files = [folder / c["adapter"] for c in concepts]
    names = sorted(read_lora_file(files[0])[0])
    rank = max(int(c["adapter_rank"]) for c in concepts)
    inject_multi_lora(bb.unet, num_adapters=len(concepts), rank=rank, targets=names)
    for k, file in enumerate(files):
        load_lora_adapter(bb.unet, file, slot=k)
    return PersonalizedModel(bb, index, folder, single=False, slots={c["token"]: k for k, c in enumerate(concepts)})


@torch.no_grad()
def _fold_into_weights(unet, factors, scales, folder) -> None:
    """W_l += scale_l · B_l A_l for every layer of the file (fp32 accumulation, ``ops.merge_lora_``);
    every layer is checked before any weight changes."""
    from fastcp import ops

    modules = dict(unet.named_modules())
    for name, (a, b) in factors.items():
        m = modules.get(name)
        if not isinstance(m, torch.nn.Linear) or tuple(m.weight.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(f"model {folder}: the LoRA of {name} (A {list(a.shape)}, B {list(b.shape)}) does not fit "
                             "the base model; is --base_model the model the run was trained on?")
    for name, (a, b) in factors.items():
        w = modules[name].weight
        ops.merge_lora_(w, a.to(w.device), b.to(w.device), scales[name])


# --------------------------------------------------------------------------- files
def slug(prompt: str, width: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()
    return s[:width].rstrip("-") or "prompt"


def image_names(prompts: list[str], num_images: int) -> list[str]:
    """Deterministic file names: ``<prompt index>_<slug>_<k>.png`` (prompt-major, like ``generate``)."""
    return [f"{p:03d}_{slug(prompt)}_{k:02d}.png" for p, prompt in enumerate(prompts) for k in range(num_images)]


def save_images(images: torch.Tensor, prompts: list[str], num_images: int, out_dir: Path, model: PersonalizedModel,
                seed: int) -> list[Path]:
    """PNGs, ``grid.png`` (a row per prompt) and ``images.json``; every file written atomically."""
    from fastcp.eval.report import save_sample_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    names, paths = image_names(prompts, num_images), []
    for a, name in zip(images_to_uint8(images), names):
        atomic_write_png(out_dir / name, a)
        paths.append(out_dir / name)
    rows = {p: images[p * num_images : (p + 1) * num_images] for p in range(len(prompts))}
    save_sample_grid(rows, prompts, out_dir / "grid.png", upscale=max(1, 96 // images.shape[-1]))
    ids = model.adapter_ids(prompts).tolist()
    by_slot = {k: t for t, k in model.slots.items()}
    atomic_write_json(out_dir / "images.json", {
        "model": str(model.folder), "method": model.index["method"],
        "images": [{"file": names[p * num_images + k], "prompt": prompt, "seed": seed + k,
                    "concept_token": None if model.single else by_slot.get(ids[p])}
                   for p, prompt in enumerate(prompts) for k in range(num_images)]})
    return paths


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from fastcp.methods.hparams import NATURAL, POSINT

    p = argparse.ArgumentParser(prog="python -m fastcp.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a run's --output_dir, or its model/ folder")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeatable); its concept is the concept token it contains (default: every "
                        "concept's own prompt)")
    p.add_argument("--prompt_file", type=Path, default=None,
                   help="a text file with one prompt per line (blank lines and lines starting with # skipped), "
                        "added after the --prompt ones")
    p.add_argument("--num_images", type=POSINT, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=NATURAL, default=0, help="image k of every prompt uses seed + k (default 0)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance (default 3.0)")
    p.add_argument("--num_inference_steps", type=POSINT, default=25, help="DPM-Solver++ steps (default 25)")
    p.add_argument("--batch_size", type=POSINT, default=16,
                   help="samples per batched pass, concepts mixed (default 16)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--base_model", default=None,
                   help="the base model's directory when it moved since training (default: the one in the index)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights and sampling dtype")
    return p


def read_prompts(args) -> list[str] | None:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--prompt_file {args.prompt_file}: cannot read it ({exc.__class__.__name__})") from exc
        from fastcp.eval.prompts import prompt_lines

        prompts += prompt_lines(text)
        if len(prompts) == len(args.prompt):
            raise ValueError(f"--prompt_file {args.prompt_file} holds no prompt")
    return prompts or None


def _fail(msg: str) -> int:
    print(f"fastcp.generate: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        prompts = read_prompts(args)
        from fastcp.models.export import read_index

        read_index(args.run)  # a missing run fails before any model loads
        model = load_model(args.run, base_model=args.base_model, device=args.device, dtype=dtype)
        prompts = prompts or [c["prompt"] for c in model.index["concepts"]]
        model.adapter_ids(prompts)  # unknown tokens are refused before any sampling
        images = model.generate(prompts, num_images=args.num_images, seed=args.seed,
                                guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                                batch_size=args.batch_size)
    except ValueError as exc:
        return _fail(str(exc).splitlines()[0])
    paths = save_images(images, prompts, args.num_images, Path(args.output_dir), model, args.seed)
    print(f"wrote {len(paths)} images and grid.png to {args.output_dir}")
    return 0


def cli() -> int:
    return main()


if __name__ == "__main__":
    raise SystemExit(main())
