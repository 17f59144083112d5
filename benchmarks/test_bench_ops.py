"""pytest-benchmark suite of the fused multi-LoRA op: DESIGN.md section 8's cases, saved and compared as JSON.

    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-autosave        # save a run
    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-compare          # compare with the last one
    pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr

Each group is one (shape, case, mode): the bare GEMM and fastcp side by side, so every section-8 ratio is
one group (k1 against bare_gemm; routed / routed_unsorted against single; dense against stacked). On a GPU
(bf16, SD1.5 shapes) every row is timed eagerly and as a CUDA-graph replay (``timing=graph``); on the CPU
(fp32, small shapes, the cpp backend) eagerly only. ``bench_multi_lora.py`` computes the ratios in one run.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

from bench_multi_lora import CPU_SHAPES, GPU_SHAPES, case_inputs  # noqa: E402

from fastcp.ops import multi_lora_linear, routing_plan  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES[:2]
CASES = ["k1", "single", "routed", "routed_unsorted", "stacked", "dense"]
TIMINGS = ["eager", "graph"] if CUDA else ["eager"]


def _fn(shape, case, provider, mode):
    name, B, T, IN, OUT = shape
    if case in ("single", "routed", "routed_unsorted"):
        B = max(B, 16) if CUDA else B * 4
    g = torch.Generator().manual_seed(0)
    K, r, ids, coef = case_inputs(case, B, 16, 16 if CUDA else 8, 4, 8, DEV, g)
    x = torch.randn(B, T, IN, generator=g).to(DEV, DTYPE).requires_grad_(mode == "fwd+bwd")
    W, b = torch.randn(OUT, IN, generator=g).to(DEV, DTYPE) / IN**0.5, torch.zeros(OUT, device=DEV, dtype=DTYPE)
    A = (torch.randn(K, r, IN, generator=g) / IN**0.5).to(DEV, DTYPE).requires_grad_(mode == "fwd+bwd")
    Bm = (torch.randn(K, OUT, r, generator=g) * 0.02).to(DEV, DTYPE).requires_grad_(mode == "fwd+bwd")
    plan = routing_plan(B, K, adapter_ids=ids, coef=None if coef is None else coef.to(DTYPE), device=DEV)
    dy = torch.randn(B, T, OUT, generator=g).to(DEV, DTYPE)
    bwd = mode == "fwd+bwd"

    def run():
        if provider == "bare_gemm":
            y = F.linear(x, W, b)
            if bwd:
                torch.autograd.grad(y, (x,), dy)
        else:
            y = multi_lora_linear(x, W, b, A, Bm, 1.0, plan=plan)
            if bwd:
                torch.autograd.grad(y, (x, A, Bm), dy)
    return run


@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["bare_gemm", "fastcp"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_multi_lora_linear(benchmark, shape, case, provider, mode, timing):
    if provider == "bare_gemm" and case not in ("k1", "single"):
        pytest.skip("the bare GEMM is the baseline of k1 (and single's batch)")
    fn = _fn(shape, case, provider, mode)
    benchmark.group = f"{shape[0]} {case} {mode} {timing}"
    benchmark.extra_info.update(device=str(DEV), dtype=str(DTYPE))
    if timing == "graph":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    if CUDA:
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark(fn)
