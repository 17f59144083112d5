"""torch.compile(fullgraph=True) of a UNet with fused LoRA layers: no graph break, and the compiled
forward and LoRA gradients equal eager.

The ops are torch.library ops with fake kernels and autograd, and dispatch is a trace-time constant,
so dynamo traces the UNet as one graph per routing mode. ``aot_eager`` runs the full
dynamo → AOTAutograd (fake tensors, joint forward/backward graph) pipeline without inductor's code
generation, which costs minutes on 2 CPU cores and tests nothing of fastcp's (the GPU suite compiles
with inductor: benchmarks/gpu_suite.py --part tests). The cpp backend is CPU's default; the Triton
path runs the interpreter (a custom op with a fake kernel there; ``triton_op`` on a GPU).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastcp.nn import ATTENTION_TARGETS, inject_multi_lora, lora_layers, lora_routing  # noqa: E402
from fastcp.ops import available_backends  # noqa: E402


def _unet():
    from fastcp.models.tiny import build_unet

    torch.manual_seed(0)
    unet = build_unet()
    inject_multi_lora(unet, num_adapters=3, rank=4, targets=ATTENTION_TARGETS)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_b.normal_(std=0.1)
    return unet


def _check_compiled_matches_eager(unet, routings):
    layers = lora_layers(unet)
    params = [p for l in layers.values() for p in (l.lora_a, l.lora_b)]
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 400])
    c = torch.randn(2, 10, unet.config.cross_attention_dim, generator=g)

    def step(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for kw in routings:
        with lora_routing(unet, **kw):
            y_eager = step(x, t, c)
            g_eager = torch.autograd.grad(y_eager.square().mean(), params)
            y_comp = compiled(x, t, c)
            g_comp = torch.autograd.grad(y_comp.square().mean(), params)
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_comp, g_eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert sum(float(a.abs().sum()) for a in g_comp) > 0


@pytest.mark.skipif("cpp" not in available_backends(), reason="fastcp._C not built")
def test_fullgraph_compile_cpp_routed_and_dense(monkeypatch):
    monkeypatch.delenv("FASTCP_BACKEND", raising=False)
    _check_compiled_matches_eager(_unet(), [dict(adapter_ids=torch.tensor([2, -1])), dict(coef=torch.rand(2, 3))])


@pytest.mark.skipif("triton" not in available_backends(), reason="triton backend unavailable")
def test_fullgraph_compile_triton_routed(monkeypatch):
    monkeypatch.setenv("FASTCP_BACKEND", "triton")
    _check_compiled_matches_eager(_unet(), [dict(adapter_ids=torch.tensor([1, -1]))])
