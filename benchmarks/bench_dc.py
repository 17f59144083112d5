"""Diffusion-classifier throughput: UNet passes per second (one pass = one (image, concept, timestep) row).

    python benchmarks/bench_dc.py            # CPU: tiny backbone, N=2 images, K=6 concepts, T=8 timesteps
    python benchmarks/bench_dc.py --sd15     # GPU: SD 1.5 UNet architecture (random weights), bf16, 64x64 latents

Providers: ``loop`` (one UNet call per row, ``fastcp.dc.errors_loop``), ``batched_plain`` (rows
batched, nothing shared: plain diffusers batching of the UNet), ``batched_no_kv`` (+ prompt-independent first blocks once per (image,
timestep)), ``batched`` (the engine: + cross-attention K/V once per concept). All with K LoRA
adapters routed per concept. ``--channels_last`` / ``--compile`` add ``batched+cl`` /
``batched+cl+compile`` (the engine's ``channels_last`` / ``compile`` options: UNet blocks compiled one
by one with ``Module.compile``, so the shared-prefix forward, which calls the blocks directly, runs
compiled too). Every row carries ``prefix_flop_frac``, the share of a pass's FLOPs in the
prompt-independent prefix (``fastcp.dc.shared_prefix.prefix_flops``), and whether the engine shares it.

Every row also carries the FLOPs of one plain UNet pass (``torch.utils.flop_counter``, LoRA
included), the FLOPs per pass the provider actually executes, and ``tflops_equiv`` = passes/s × that: the engine skips part of that work, so on a
GPU ``peak_frac`` = tflops_equiv / the device's dense bf16 peak can be read as "the share of
peak a plain batched UNet would need to match this speed". The counter sees matmuls and
convolutions everywhere but SDPA only where torch registers a formula for it (the CUDA kernels,
not the CPU one): CPU figures leave attention out. Results go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, git_commit, measure, versions, write_rows  # noqa: E402

from fastcp.dc import DiffusionClassifier, errors_loop  # noqa: E402
from fastcp.models.backbone import Conditioning  # noqa: E402
from fastcp.nn import inject_multi_lora, lora_layers  # noqa: E402

from sd15 import SD15_UNET  # noqa: E402  (the SD 1.5 UNet architecture, config written out: no download)


def setup(args, device, dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    if args.sd15:
        unet = UNet2DConditionModel(**SD15_UNET)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        cond = Conditioning(torch.randn(args.concepts, 77, 768, generator=g))
        shape = (4, 64, 64)
    else:
        from fastcp.models import load_backbone

        bb = load_backbone("tiny")
        unet, sched = bb.unet, bb.scheduler
        with torch.no_grad():
            cond = bb.encode_prompt([f"a photo of a {w}" for w in ("star", "heart", "ring", "square", "triangle",
                                                                  "diamond", "cross", "circle")][: args.concepts])
        shape = (3, 32, 32)
    inject_multi_lora(unet, num_adapters=args.concepts, rank=4)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_b.normal_(generator=g).mul_(0.01)
    unet.to(device, dtype).eval().requires_grad_(False)
    x = torch.randn(args.images, *shape, generator=g).to(device, dtype)
    noise = torch.randn(args.timesteps, *shape, generator=g).to(device, dtype)
    ts = torch.linspace(50, 950, args.timesteps).long().to(device)
    ids = torch.arange(args.concepts, device=device)
    return unet, sched, cond.to(device=device, dtype=dtype), x, noise, ts, ids


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by device-name substring.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def flops_per_pass(unet, sched, cond, x, noise, ts, ids) -> int:
    """FLOPs of one plain UNet pass (one row, LoRA routed) as counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        errors_loop(unet, sched, x[:1], cond.select(torch.tensor([0], device=x.device)), ts[:1], noise[:1], ids[:1])
    return int(counter.get_total_flops())


def executed_flops(fn) -> int:
    """FLOPs one call of ``fn`` actually runs (what sharing the prefix and caching K/V skip shows here)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd15", action="store_true")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--concepts", type=int, default=6)
    ap.add_argument("--timesteps", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=None, help="rows per UNet call (default: all)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no_loop", action="store_true", help="skip the plain loop (slow at large sizes)")
    ap.add_argument("--channels_last", action="store_true", help="also time the engine with channels_last")
    ap.add_argument("--compile", action="store_true", help="also time the engine with compiled blocks (+channels_last)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--out_dir", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet, sched, cond, x, noise, ts, ids = setup(args, device, dtype)
    passes = args.images * args.concepts * args.timesteps
    dev_name = device_name(device)
    providers = {
        "batched": lambda: DiffusionClassifier(unet, sched).errors(x, cond, ts, noise, ids, batch_size=args.batch_size),
        "batched_no_kv": lambda: DiffusionClassifier(unet, sched, kv_cache=False).errors(
            x, cond, ts, noise, ids, batch_size=args.batch_size),
        "batched_plain": lambda: DiffusionClassifier(unet, sched, kv_cache=False, share_prefix=False).errors(
            x, cond, ts, noise, ids, batch_size=args.batch_size),
    }
    if not args.no_loop:
        providers["loop"] = lambda: errors_loop(unet, sched, x, cond, ts, noise, ids)
    meta = {"device": dev_name, "dtype": str(dtype).replace("torch.", ""), "commit": git_commit(),
            "model": "sd15-arch-random" if args.sd15 else "tiny", "N": args.images, "K": args.concepts,
            "T": args.timesteps, "batch_size": args.batch_size or passes,
            **{f"v_{k}": v for k, v in versions().items()}}
    rows = []
    from fastcp.dc import shared_prefix

    pf = shared_prefix.prefix_flops(unet, tuple(x.shape[1:]), tuple(cond.encoder_hidden_states.shape[1:]))
    meta["prefix_flop_frac"] = round(pf["fraction"], 5)  # what sharing the prompt-independent prefix can save
    meta["prefix_shared"] = DiffusionClassifier(unet, sched).share_prefix
    print(f"shared prefix: {100 * pf['fraction']:.2f}% of a pass's FLOPs; used: {meta['prefix_shared']}")
    fpp = flops_per_pass(unet, sched, cond, x, noise, ts, ids)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in dev_name), None) if device.type == "cuda" else None
    executed = {p: executed_flops(fn) for p, fn in providers.items()}
    with torch.no_grad():
        results = {p: measure(fn, warmup=1, reps=args.reps, device=device) for p, fn in providers.items()}
        # engine options (they convert / compile the UNet in place, so they run last)
        if args.channels_last or args.compile:
            engine = DiffusionClassifier(unet, sched, channels_last=True)
            if args.channels_last:
                results["batched+cl"] = measure(lambda: engine.errors(x, cond, ts, noise, ids, batch_size=args.batch_size),
                                                warmup=1, reps=args.reps, device=device)
            if args.compile:
                engine = DiffusionClassifier(unet, sched, channels_last=True, compile=True)
                results["batched+cl+compile"] = measure(
                    lambda: engine.errors(x, cond, ts, noise, ids, batch_size=args.batch_size),
                    warmup=3, reps=args.reps, device=device)
    base = results.get("loop", results["batched_no_kv"])["p50_ms"]
    for p, t in results.items():
        rows.append({"op": "dc_errors", "provider": p, "passes": passes, **{k: round(v, 3) for k, v in t.items()},
                     "passes_per_s": round(passes / (t["p50_ms"] / 1e3), 1),
                     "speedup_vs_loop": round(base / t["p50_ms"], 2) if "loop" in results else None,
                     "gflop_per_pass": round(fpp / 1e9, 4),
                     # variants of the engine (channels_last, compiled) run the engine's FLOPs
                     "gflop_executed_per_pass": round(executed.get(p, executed["batched"]) / passes / 1e9, 4),
                     "tflops_equiv": round(passes * fpp / (t["p50_ms"] / 1e3) / 1e12, 4),
                     "peak_frac": (round(passes * fpp / (t["p50_ms"] / 1e3) / 1e12 / peak, 4) if peak else None),
                     **meta})
        vs = f"{rows[-1]['speedup_vs_loop']}x the loop" if "loop" in results else "loop not run"
        print(f"{p:>18}: {t['p50_ms']:9.1f} ms  {rows[-1]['passes_per_s']:9.1f} passes/s  "
              f"{rows[-1]['tflops_equiv']:8.4f} TFLOP/s equiv  ({vs})")
    kw = {"out_dir": args.out_dir} if args.out_dir else {}
    stem = args.out or ("dc_gpu_sd15" if args.sd15 else f"dc_{device.type}_tiny")
    csv_path, json_path = write_rows(rows, stem, **kw)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
