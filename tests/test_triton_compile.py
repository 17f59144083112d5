"""The Triton kernels compile for an H100 (sm_90) without a GPU, in the variants that actually run.

The interpreter accepts code that the real compiler rejects (loop-carried type changes, bad layouts), so
CI compiles the kernels to cubins with Triton's bundled ptxas. Which variants: the test runs the real
launchers of a routed and a dense SD-1.5-sized layer, forward and backward, with ``_launch`` replaced by a
recorder, so every launch the backend makes is captured with its actual arguments; each is then compiled
with the specialisation Triton's JIT would give those arguments on a GPU (16-byte-aligned pointers and
multiples of 16 marked divisible, ints equal to 1 turned into constants). Routed launches compile every
autotune candidate, dense ones (K·r = 256, the largest tiles) the first two; for each variant at least one
candidate must fit the H100's shared memory (autotune skips the others).

A second check runs the GPU registration itself (``triton_op`` bodies with ``wrap_triton`` launches) on fake
CUDA tensors, as torch.compile's tracing does, for output shapes and dtypes.

The compile runs in a subprocess: with TRITON_INTERPRET=1 (set for the other tests) @triton.jit returns
interpreter functions that cannot be compiled.
"""
import json
import os
import subprocess
import sys

import pytest

H100_SMEM = 232448  # bytes of shared memory per block on sm_90 (opt-in maximum)


def _record_launches(dtype_name: str) -> list[tuple[str, dict, dict]]:
    """[(kernel name, {arg: value}, {constexpr: value})] of every launch of a routed and a dense layer."""
    import torch

    from fastcp.kernels import multi_lora as K
    from fastcp.ops.backends import triton as tb
    from fastcp.ops.routing import routing_plan

    launches = []

    def recorder(kernel):
        jit = kernel.fn if hasattr(kernel, "configs") else kernel

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    names = jit.arg_names
                    bound = dict(zip(names, args))
                    consts = {k: v for k, v in kwargs.items() if k in names}
                    launches.append((jit.__name__, bound, consts, kernel))
                return run
        return _Grid()

    tb._register()  # binds the kernels module the op bodies use (and defines the ops, as on a GPU: triton_op)
    K._launch = recorder
    dtype = getattr(torch, dtype_name)
    B, L, IN, OUT, Kn, r = 4, 64, 640, 640, 16, 16
    for mode in ("routed", "dense"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B * L, IN, generator=g).to(dtype)
        W, bias = torch.randn(OUT, IN).to(dtype), torch.randn(OUT).to(dtype)
        A, Bm = torch.randn(Kn, r, IN).to(dtype), torch.randn(Kn, OUT, r).to(dtype)
        scale = torch.ones(Kn)
        if mode == "routed":
            plan = routing_plan(B, Kn, adapter_ids=torch.tensor([3, -1, 0, 3]))
        else:
            plan = routing_plan(B, Kn, coef=torch.rand(B, Kn).to(dtype))
        y, S = tb._forward_impl(x, W, bias, A, Bm, scale, plan.order, plan.bounds, plan.coef, L, mode == "routed")
        tb._backward_impl(torch.randn_like(y), x, W, A, Bm, scale, S, plan.order, plan.bounds, plan.coef, L,
                          mode == "routed", True, True, True, plan.coef is not None)
    return launches


def _compile_all(dtype_name: str) -> dict:
    """{"kernel variant": [shared bytes of each candidate config]} for sm_90."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    out = {}
    for name, bound, consts, kernel in _record_launches(dtype_name):
        jit = kernel.fn if hasattr(kernel, "configs") else kernel
        sig, constexprs, attrs = {}, dict(consts), {}
        for i, a in enumerate(jit.arg_names):
            if a in constexprs:
                continue
            if a not in bound:  # an autotuned constexpr (BLOCK_*): filled per config below
                continue
            kind, spec = native_specialize_impl(BaseBackend, bound[a], False, True, True)
            if kind == "constexpr":  # ints equal to 1
                constexprs[a] = spec
                continue
            sig[a] = kind
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        variant = f"{name} " + " ".join(f"{k}={v}" for k, v in sorted(consts.items())) + \
            " " + ",".join(sorted(a for a, v in constexprs.items() if a not in consts))
        if variant in out:
            continue
        configs = list(kernel.configs) if hasattr(kernel, "configs") else [None]
        if consts.get("STACKED"):
            configs = configs[:2]  # the largest tiles compile slowly; all candidates are covered for routed
        shared = []
        for cfg in configs:
            cx = dict(constexprs, **(cfg.kwargs if cfg else {}))
            s = dict(sig)
            for a in cx:
                s[a] = "constexpr"
            opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if cfg else \
                dict(num_warps=consts.get("num_warps", 4))
            src = ASTSource(fn=jit, signature={a: s[a] for a in jit.arg_names if a in s}, constexprs=cx, attrs=attrs)
            compiled = triton.compile(src, target=target, options=opts)
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
            shared.append(compiled.metadata.shared)
        out[variant] = shared
    return out


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
def test_every_launched_kernel_variant_compiles_for_sm90_with_alignment():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTCP_TRITON_AUTOTUNE"] = "1"
    res = subprocess.run([sys.executable, "-P", __file__, "bfloat16"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    kernels = {v.split()[0] for v in shared}
    assert kernels == {"_shrink_kernel", "_fused_kernel", "_dy_pass_kernel", "_outer_kernel", "_reduce_kernel"}, kernels
    # forward and dx GEMMs (W read along IN, then transposed) are distinct variants, per mode
    assert sum(v.startswith("_fused_kernel") for v in shared) >= 4
    for variant, sizes in shared.items():
        assert min(sizes) <= H100_SMEM, f"{variant}: no candidate fits the H100's shared memory: {sizes}"


def _fake_trace() -> list:
    """The GPU registration (``triton_op`` + ``wrap_triton``) run on fake CUDA tensors: what torch.compile's
    tracing does with the op bodies. Returns [[shape, dtype] of every output] for a routed and a dense call."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from fastcp.ops.backends import triton as tb

    tb._register()
    B, L, IN, OUT, K, r = 4, 64, 640, 320, 16, 16
    mode = FakeTensorMode()

    def fk(*shape, dtype=torch.bfloat16):
        return FakeTensor(mode, torch.empty(*shape, dtype=dtype, device="meta"), torch.device("cuda"))

    out = []
    with mode:
        x, W, b, A, Bm = fk(B * L, IN), fk(OUT, IN), fk(OUT), fk(K, r, IN), fk(K, OUT, r)
        scale, order = fk(K, dtype=torch.float32), fk(B, dtype=torch.int32)
        for routed, coef, bounds in ((True, None, fk(K + 2, dtype=torch.int32)), (False, fk(B, K), fk(2, dtype=torch.int32))):
            y, S = torch.ops.fastcp.lora_triton_forward(x, W, b, A, Bm, scale, order if routed else None, bounds, coef, L,
                                                        routed)
            grads = torch.ops.fastcp.lora_triton_backward(y, x, W, A, Bm, scale, S, order if routed else None, bounds,
                                                          coef, L, routed, True, True, True, coef is not None)
            out.append([[list(t.shape), str(t.dtype), str(t.device)] for t in (y, S, *grads)])
    return out


def test_gpu_registration_traces_on_fake_cuda_tensors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-P", __file__, "fake"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    routed, dense = json.loads(res.stdout.strip().splitlines()[-1])
    bf16, f32 = "torch.bfloat16", "torch.float32"
    assert routed == [[[256, 320], bf16, "cuda:0"], [[256, 16], f32, "cuda:0"], [[256, 640], bf16, "cuda:0"],
                      [[16, 16, 640], bf16, "cuda:0"], [[16, 320, 16], bf16, "cuda:0"], [[0], bf16, "cuda:0"]]
    assert dense[1][0] == [256, 256] and dense[-1][0] == [4, 16]  # S of rank K·r; dcoef per sample


if __name__ == "__main__":
    if sys.argv[1:] == ["fake"]:
        print(json.dumps(_fake_trace()))
    else:
        print(json.dumps(_compile_all(sys.argv[1] if len(sys.argv) > 1 else "bfloat16")))
