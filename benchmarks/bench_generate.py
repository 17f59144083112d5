"""Serving many personalized concepts: fastcp's one routed batch against diffusers' ``set_adapters`` per concept.

    python benchmarks/bench_generate.py                 # CPU: the tiny SD fixture, 4 concepts, 2 images each
    python benchmarks/bench_generate.py --sd15          # GPU: SD 1.5 architecture (random weights), bf16, 512 px

A model with one adapter per concept (the ``separate``/``fl2t`` export layout: ``model/adapters/<name>/``,
random LoRA factors of ``--rank`` on every attention projection, a random token per concept) is
written with ``fastcp.models.export.write_model`` and served for K concepts × M images, same
prompts, steps, guidance and sampler (DPM-Solver++), in the same process:

- ``fastcp_routed``: ``fastcp.generate`` loads the exported folder and runs all K·M samples in ONE
  batched pass per denoising step, each sample (and its unconditional CFG row) routed to its
  concept's adapter slot by the fused multi-LoRA op (the S-LoRA/Punica case);
- ``fastcp_per_concept``: the same loaded model, one call per concept (what batching alone gains);
- ``diffusers_set_adapters``: a diffusers pipeline with every adapter loaded by name
  (``load_lora_weights(..., adapter_name=...)``) and ``set_adapters(name)`` + one pipeline call per
  concept: how diffusers serves several LoRAs.

Rows: p20/p50/p80 ms of generating every image, images/s, and the ratios of the same run
(``speedup_vs_diffusers`` = diffusers / fastcp_routed). ``max_abs_diff`` compares concept 0's images
of fastcp and diffusers from the same initial noise (both as [0, 1] pixels): the two run the same model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, git_commit, measure, versions, write_rows  # noqa: E402


def make_model(pipe_dir: Path, dest: Path, concepts: int, rank: int, seed: int = 0) -> list:
    """Write a per-concept model for the pipeline: K adapters of ``rank`` on every attention
    projection (A ~ N(0, 1/in), B ~ N(0, 0.02²)·… so each concept visibly changes the output)."""
    from fastcp.models import load_backbone
    from fastcp.models.export import write_model
    from fastcp.nn import ATTENTION_TARGETS

    bb = load_backbone(pipe_dir)
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in bb.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in ATTENTION_TARGETS)}
    cs, adapters = [], {}
    for k in range(concepts):
        token = f"<c{k}>"
        bb.add_concept_token(token, generator=g)
        cs.append(SimpleNamespace(name=f"concept{k}", token=token, prompt=f"a photo of {token} dog", class_word="dog"))
        adapters[cs[-1].name] = {
            n: (torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5,
                torch.randn(m.out_features, rank, generator=g) * 0.5 / rank ** 0.5)
            for n, m in linears.items()}
    write_model(dest, bb, method="separate", form="per_concept", concepts=cs, adapters=adapters)
    return cs


def diffusers_pipeline(pipe_dir: Path, model_dir: Path, concepts: list, device, dtype):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=dtype, safety_checker=None)
    # fastcp samples with DPM-Solver++ from the training scheduler's config: the same here
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    for c in concepts:
        pipe.load_lora_weights(model_dir / "adapters" / c.name, adapter_name=c.name)
        pipe.load_textual_inversion(model_dir / "embeddings" / f"{c.name}.safetensors")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd15", action="store_true", help="the SD 1.5 architecture at 512 px (a GPU)")
    ap.add_argument("--concepts", type=int, default=4, help="K concepts (adapters) in the batch")
    ap.add_argument("--images", type=int, default=2, help="M images per concept")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="denoising steps")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--out_dir", type=Path, default=None)
    args = ap.parse_args(argv)
    from fastcp import generate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    K, M = args.concepts, args.images
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as td:
        tmp = Path(td)
        if args.sd15:
            from sd15 import make_pipeline

            pipe_dir = make_pipeline(tmp / "pipe")
        else:
            from fastcp.models.testing import make_tiny_sd_pipeline

            pipe_dir = make_tiny_sd_pipeline(tmp / "pipe")
        concepts = make_model(pipe_dir, tmp / "model", K, args.rank)
        model = generate.load_model(tmp / "model", device=device, dtype=dtype)
        pipe = diffusers_pipeline(pipe_dir, tmp / "model", concepts, device, dtype)
        prompts = [c.prompt for c in concepts]
        common = dict(num_images=M, seed=0, guidance_scale=3.0, num_inference_steps=args.steps)
        noise = torch.stack([torch.randn(model.backbone.latent_shape, generator=torch.Generator().manual_seed(k))
                             for k in range(M)])

        def diffusers_run(first_only=False):
            out = []
            for c in concepts[:1] if first_only else concepts:
                pipe.set_adapters(c.name)
                out.append(pipe(c.prompt, num_images_per_prompt=M, num_inference_steps=args.steps, guidance_scale=3.0,
                                latents=noise.to(device, dtype), output_type="pt").images)
            return torch.cat(out)

        providers = {
            "fastcp_routed": lambda: model.generate(prompts, **common, batch_size=K * M),
            "fastcp_per_concept": lambda: [model.generate([p], **common, batch_size=M) for p in prompts],
            "diffusers_set_adapters": diffusers_run,
        }
        with torch.no_grad():
            ours = (model.generate(prompts[:1], **common).float().cpu() + 1) / 2
            theirs = diffusers_run(first_only=True).float().cpu()
            diff = float((ours - theirs).abs().max())
            results = {p: measure(fn, warmup=1, reps=args.reps, device=device) for p, fn in providers.items()}
    meta = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "commit": git_commit(),
            "model": "sd15-arch-random" if args.sd15 else "tiny-sd", "K": K, "M": M, "rank": args.rank,
            "steps": args.steps, "max_abs_diff": diff, **{f"v_{k}": v for k, v in versions().items()}}
    base = results["fastcp_routed"]["p50_ms"]
    rows = []
    for p, r in results.items():
        rows.append({"provider": p, **r, "images_per_s": K * M / (r["p50_ms"] / 1e3),
                     "ratio_to_fastcp_routed": r["p50_ms"] / base, **meta})
    print(f"{'provider':<24} {'p50 ms':>10} {'images/s':>10} {'x fastcp_routed':>16}")
    for r in rows:
        print(f"{r['provider']:<24} {r['p50_ms']:>10.1f} {r['images_per_s']:>10.2f} {r['ratio_to_fastcp_routed']:>16.2f}")
    print(f"speed-up of one routed batch over diffusers set_adapters per concept: "
          f"{results['diffusers_set_adapters']['p50_ms'] / base:.2f}x  (K={K} concepts x M={M} images, "
          f"{args.steps} steps, {meta['device']}); concept 0 max |fastcp - diffusers| = {diff:.2e}")
    stem = args.out or ("generate_gpu" if device.type == "cuda" else "generate_cpu")
    write_rows(rows, stem, **({"out_dir": args.out_dir} if args.out_dir else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
