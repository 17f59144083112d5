"""Microbenchmark of the fused multi-adapter LoRA linear against its baselines (DESIGN.md section 8).

    python benchmarks/bench_multi_lora.py            # GPU: SD1.5 shapes, bf16
    python benchmarks/bench_multi_lora.py --quick    # CPU: small shapes, fp32, seconds

Providers: bare GEMM (F.linear, no LoRA), peft (a real peft LoRA layer; mixed batches through
peft's ``adapter_names``), unsloth-style ``addmm_`` (y = xWᵀ; y.addmm_(xAᵀ, Bᵀ)), and fastcp's
backends (reference, cpp, triton, cuda: those that accept the input). Modes: fwd, fwd+bwd (base
weight frozen: gradients of x and the LoRA matrices). Cases: K=1 plain LoRA, routed K adapters
(one per sample), dense coef over K adapters. Every row reports p20/p50/p80 ms and the ratio to
the bare GEMM of the same shape in the same run; rows go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, git_commit, measure, versions, write_rows  # noqa: E402

from fastcp.ops import multi_lora_linear  # noqa: E402
from fastcp.ops.dispatch import get_backend  # noqa: E402

GPU_SHAPES = [  # (name, batch, tokens, in, out)
    ("attn-320", 2, 4096, 320, 320), ("attn-640", 2, 1024, 640, 640), ("attn-1280", 2, 256, 1280, 1280),
    ("attn-1280-8x8", 2, 64, 1280, 1280), ("crossKV-320", 2, 77, 768, 320), ("geglu-320", 2, 4096, 320, 2560),
    ("ffout-320", 2, 4096, 1280, 320),
]
CPU_SHAPES = [("attn-64", 4, 64, 64, 64), ("geglu-64", 4, 64, 64, 512), ("odd-310", 4, 33, 310, 250)]


def peft_layer(base: torch.nn.Linear, K: int, r: int):
    """A real peft LoRA wrapper with K adapters named a0..a{K-1} (B random so work is real)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0)
    layer = PeftLinear(base, adapter_name="a0", config=cfg, r=r, lora_alpha=r)
    for k in range(1, K):
        layer.update_layer(f"a{k}", r=r, lora_alpha=r, config=cfg)
    for k in range(K):
        torch.nn.init.normal_(layer.lora_B[f"a{k}"].weight, std=0.02)
    layer.set_adapter([f"a{k}" for k in range(K)])
    return layer


def run_case(rows, name, B, T, IN, OUT, K, r, case, device, dtype, providers, reps, meta):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, IN, generator=g).to(device, dtype)
    base = torch.nn.Linear(IN, OUT, bias=True).to(device, dtype).requires_grad_(False)
    A = (torch.randn(K, r, IN, generator=g) / IN**0.5).to(device, dtype)
    Bm = (torch.randn(K, OUT, r, generator=g) * 0.02).to(device, dtype)
    ids = torch.arange(B, device=device) % K if case == "routed" else None
    coef = torch.rand(B, K, generator=g).to(device, dtype) if case == "dense" else None

    def fastcp_fn(backend, bwd):
        def f():
            os.environ["FASTCP_BACKEND"] = backend
            xx = x.detach().requires_grad_(bwd)
            a, b_ = A.detach().requires_grad_(bwd), Bm.detach().requires_grad_(bwd)
            y = multi_lora_linear(xx, base.weight, base.bias, a, b_, 1.0, adapter_ids=ids, coef=coef)
            if bwd:
                y.backward(torch.ones_like(y))
        return f

    def bare_fn(bwd):
        def f():
            xx = x.detach().requires_grad_(bwd)
            y = F.linear(xx, base.weight, base.bias)
            if bwd:
                y.backward(torch.ones_like(y))
        return f

    def addmm_fn(bwd):
        def f():  # unsloth-style: one adapter, y = xWᵀ + b; y += (x Aᵀ) Bᵀ in place
            xx = x.detach().requires_grad_(bwd)
            a, b_ = A[0].detach().requires_grad_(bwd), Bm[0].detach().requires_grad_(bwd)
            x2 = xx.reshape(-1, IN)
            y = F.linear(x2, base.weight, base.bias)
            y = y.addmm(x2 @ a.t(), b_.t())
            if bwd:
                y.backward(torch.ones_like(y))
        return f

    layer = peft_layer(base, K, r) if "peft" in providers else None

    def peft_fn(bwd):
        names = [f"a{int(i)}" for i in ids.tolist()] if ids is not None else None

        def f():
            xx = x.detach().requires_grad_(bwd)
            y = layer(xx, adapter_names=names) if names is not None else layer(xx)
            if bwd:
                y.backward(torch.ones_like(y))
        return f

    for mode in ("fwd", "fwd+bwd"):
        bwd = mode == "fwd+bwd"
        timings = {"bare_gemm": measure(bare_fn(bwd), reps=reps, device=device)}
        if "addmm" in providers and case == "k1":
            timings["addmm_"] = measure(addmm_fn(bwd), reps=reps, device=device)
        if layer is not None and case != "dense":
            timings["peft"] = measure(peft_fn(bwd), reps=reps, device=device)
        for be in ("reference", "cpp", "triton", "cuda"):
            if be not in providers or get_backend(be).unavailable_reason() is not None:
                continue
            if be == "triton" and device.type == "cpu":
                continue  # the interpreter is a correctness tool: its timings mean nothing
            try:
                timings[be] = measure(fastcp_fn(be, bwd), reps=reps, device=device)
            except RuntimeError as exc:  # the backend refused this input
                print(f"  {be}: skipped ({str(exc)[:120]})")
        os.environ.pop("FASTCP_BACKEND", None)
        base_ms = timings["bare_gemm"]["p50_ms"]
        for prov, t in timings.items():
            row = {"op": "multi_lora_linear", "case": case, "provider": prov, "mode": mode, "shape": name,
                   "M": B * T, "in": IN, "out": OUT, "K": K, "r": r, **{k: round(v, 4) for k, v in t.items()},
                   "ratio_to_bare_gemm": round(t["p50_ms"] / base_ms, 3), **meta}
            rows.append(row)
            print(f"{name:>14} {case:>6} K={K:<2} r={r:<2} {mode:>7} {prov:>10}: {t['p50_ms']:8.3f} ms "
                  f"({row['ratio_to_bare_gemm']:.2f}x bare)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU shapes, fp32, a few reps (seconds)")
    ap.add_argument("--providers", default="bare,peft,addmm,reference,cpp,triton,cuda")
    ap.add_argument("--out", default="multi_lora_cpu" if not torch.cuda.is_available() else "multi_lora_gpu")
    ap.add_argument("--out_dir", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = CPU_SHAPES if (args.quick or device.type == "cpu") else GPU_SHAPES
    if args.quick:
        shapes = shapes[:2]
    reps = args.reps or (5 if args.quick else 30)
    providers = set(args.providers.split(","))
    meta = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "commit": git_commit(),
            **{f"v_{k}": v for k, v in versions().items()}}
    rows: list[dict] = []
    with torch.inference_mode(False):
        for name, B, T, IN, OUT in shapes:
            run_case(rows, name, B, T, IN, OUT, 1, 16 if device.type == "cuda" else 8, "k1", device, dtype, providers,
                     reps, meta)
            Kr = 16
            run_case(rows, name, max(B, Kr) if device.type == "cuda" else B * 4, T, IN, OUT, Kr, 16 if device.type == "cuda" else 8,
                     "routed", device, dtype, providers, reps, meta)
            run_case(rows, name, B, T, IN, OUT, 4, 8, "dense", device, dtype, providers, reps, meta)
    kw = {"out_dir": args.out_dir} if args.out_dir else {}
    csv_path, json_path = write_rows(rows, args.out, **kw)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
