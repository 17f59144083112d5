"""GPU-only checks of the hot path (skipped without CUDA; ``benchmarks/gpu_suite.py --part tests`` runs them).

- bf16 / fp16 through the public op on the Triton path with a shared plan and L > 1 rows per sample,
  against the fp32 reference (relative RMS error), forward and every gradient;
- the CUDA backend (when built) against the reference, forward and gradients;
- no host sync in a routed UNet forward+backward: ``torch.cuda.set_sync_debug_mode("error")`` turns
  any synchronising call into an error (the plan is built before, once);
- ``torch.compile(unet, fullgraph=True)`` with inductor, routed and dense, equals eager;
- a whole training step (forward, backward, optimizer step) captured in a CUDA graph and replayed
  gives the eager step's parameters.
"""
import pytest
import torch

from fastcp.nn import lora_layers, lora_routing
from fastcp.ops import available_backends, multi_lora_linear, routing_plan
from fastcp.ops.reference import multi_lora_linear_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12))


def _inputs(B, L, IN, OUT, K, r, mode, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, IN, generator=g)
    W, b = torch.randn(OUT, IN, generator=g) / IN**0.5, torch.randn(OUT, generator=g)
    A, Bm = torch.randn(K, r, IN, generator=g) / IN**0.5, torch.randn(K, OUT, r, generator=g) * 0.1
    s = torch.rand(K, generator=g) + 0.5
    kw = {}
    if mode == "routed":
        kw["adapter_ids"] = (torch.arange(B) % (K + 1) - 1)[torch.randperm(B, generator=g)].to(DEV)
    elif mode == "dense":
        kw["coef"] = torch.randn(B, K, generator=g).to(DEV, dtype)
    ts = [t.to(DEV, dtype) for t in (x, W, b, A, Bm)]
    return ts, s.to(DEV), kw


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["routed", "dense", "all"])
def test_backend_16bit_close_to_fp32_reference(backend, dtype, mode):
    if backend not in available_backends():
        pytest.skip(f"{backend} backend unavailable")
    if backend == "cuda" and mode != "routed":
        pytest.skip("the cuda backend's own kernels are the routed ones")
    (x, W, b, A, Bm), s, kw = _inputs(24, 77, 320, 640, 4, 16, mode, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, Bm)] + ([kw["coef"].clone().requires_grad_()] if "coef" in kw else [])
    kw_op = dict(kw, coef=leaves[3]) if "coef" in kw else kw
    y = multi_lora_linear(leaves[0], W, b, leaves[1], leaves[2], s, backend=backend, **kw_op)
    dy = torch.randn_like(y)
    got = (y,) + torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    kw_ref = dict(kw, coef=ref_leaves[3]) if "coef" in kw else kw
    y_ref = multi_lora_linear_reference(ref_leaves[0], W.float(), b.float(), ref_leaves[1], ref_leaves[2], s, **kw_ref)
    want = (y_ref,) + torch.autograd.grad(y_ref, ref_leaves, dy.float())
    for name, a, e in zip(["y", "dx", "dA", "dB", "dcoef"], got, want):
        assert a.dtype == dtype
        assert rel_rms(a, e) < 1e-2, f"{name}: relative RMS error {rel_rms(a, e):.3g}"


def _unet(K=3, dtype=torch.float32):
    from fastcp.models.testing import random_lora_unet

    return random_lora_unet(K).to(DEV, dtype)


def _batch(unet, B=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 3, 32, 32, generator=g).to(DEV, dtype)
    t = torch.randint(0, 1000, (B,), generator=g).to(DEV)
    c = torch.randn(B, 10, unet.config.cross_attention_dim, generator=g).to(DEV, dtype)
    return x, t, c


@pytest.mark.parametrize("routing", ["routed", "dense"])
def test_unet_forward_backward_makes_no_host_sync(routing):
    unet = _unet()
    x, t, c = _batch(unet)
    kw = dict(adapter_ids=torch.tensor([2, -1, 0, 2], device=DEV)) if routing == "routed" else \
        dict(coef=torch.rand(4, 3, device=DEV, requires_grad=True))
    with lora_routing(unet, **kw):
        unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()  # warm-up: autotuning syncs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = unet(x, t, encoder_hidden_states=c).sample.square().mean()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("routing", ["routed", "dense", "all"])
def test_fullgraph_inductor_compile_matches_eager(routing):
    unet = _unet()
    x, t, c = _batch(unet)
    params = [p for l in lora_layers(unet).values() for p in (l.lora_a, l.lora_b)]
    kw = {"routed": dict(adapter_ids=torch.tensor([2, -1, 0, 1], device=DEV)),
          "dense": dict(coef=torch.rand(4, 3, device=DEV)), "all": {}}[routing]

    def step(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    compiled = torch.compile(step, fullgraph=True)
    with lora_routing(unet, **kw):
        y0 = step(x, t, c)
        g0 = torch.autograd.grad(y0.square().mean(), params)
        y1 = compiled(x, t, c)
        g1 = torch.autograd.grad(y1.square().mean(), params)
    assert rel_rms(y1, y0) < 1e-4
    for a, b in zip(g1, g0):
        assert rel_rms(a, b) < 1e-3


def test_training_step_captures_in_a_cuda_graph():
    unet = _unet()
    unet.requires_grad_(False)
    params = [p for l in lora_layers(unet).values() for p in (l.lora_a, l.lora_b)]
    for p in params:
        p.requires_grad_(True)
    x, t, c = _batch(unet)
    ids = torch.tensor([2, -1, 0, 1], device=DEV)
    opt = torch.optim.SGD(params, lr=1e-2)
    plan = routing_plan(4, 3, adapter_ids=ids)

    def step():
        opt.zero_grad(set_to_none=False)
        with lora_routing(unet, adapter_ids=ids):
            for l in lora_layers(unet).values():
                l.plan = plan  # the plan is built once, outside the captured region
            loss = unet(x, t, encoder_hidden_states=c).sample.square().mean()
        loss.backward()
        opt.step()
        return loss

    start = [p.detach().clone() for p in params]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up (autotuning, allocator) on a side stream, as capture requires
            step()
    torch.cuda.current_stream().wait_stream(s)
    for p, p0 in zip(params, start):
        p.data.copy_(p0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for p, p0 in zip(params, start):
        p.data.copy_(p0)
    graph.replay()
    after_graph = [p.detach().clone() for p in params]
    for p, p0 in zip(params, start):
        p.data.copy_(p0)
    step()
    for a, b in zip(after_graph, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-6)
    assert any((a - p0).abs().sum() > 0 for a, p0 in zip(after_graph, start))
