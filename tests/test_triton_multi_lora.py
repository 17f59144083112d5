"""Triton backend (interpreter on CPU, fp32) against the reference: forward and every gradient."""
import os

import pytest
import torch

from fastcp.ops import multi_lora_linear
from fastcp.ops.dispatch import get_backend
from fastcp.ops.reference import multi_lora_linear_reference

pytestmark = pytest.mark.skipif(get_backend("triton").unavailable_reason() is not None,
                                reason=f"triton: {get_backend('triton').unavailable_reason()}")


def make(B, mid, inn, out, K, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *mid, inn, generator=g), torch.randn(out, inn, generator=g) / inn**0.5,
            torch.randn(out, generator=g), torch.randn(K, r, inn, generator=g) / inn**0.5,
            torch.randn(K, out, r, generator=g), torch.rand(K, generator=g) + 0.5)


def run(fn, x, W, b, A, Bm, s, coef, ids, dy):
    leaves = [t.clone().requires_grad_() for t in (x, W, b, A, Bm)] + ([coef.clone().requires_grad_()] if coef is not None else [])
    y = fn(*leaves[:5], s, coef=leaves[5] if coef is not None else None, adapter_ids=ids)
    return y, torch.autograd.grad(y, leaves, dy)


CASES = [
    # (B, mid, in, out, K, r, mode)
    (3, (5,), 31, 25, 1, 1, "all"),
    (4, (3,), 310, 250, 3, 3, "routed"),
    (5, (7,), 40, 33, 16, 16, "routed"),
    (3, (2, 3), 24, 20, 3, 3, "dense"),
    (6, (), 17, 19, 16, 1, "dense"),
    (2, (9,), 20, 36, 3, 16, "all"),
]


@pytest.mark.parametrize("B,mid,inn,out,K,r,mode", CASES)
def test_triton_matches_reference(monkeypatch, B, mid, inn, out, K, r, mode):
    monkeypatch.setenv("FASTCP_BACKEND", "triton")
    x, W, b, A, Bm, s = make(B, mid, inn, out, K, r, seed=B * 100 + K)
    coef = ids = None
    if mode == "dense":
        coef = torch.randn(B, K)
        coef[0] = 0          # a base-only sample
        coef[:, -1] = 0      # an adapter off everywhere
    elif mode == "routed":
        ids = torch.tensor([(i * 7) % K if i % 3 else -1 for i in range(B)])  # -1 rows, adapters with no rows
    dy = torch.randn(B, *mid, out, generator=torch.Generator().manual_seed(7))
    y, grads = run(multi_lora_linear, x, W, b, A, Bm, s, coef, ids, dy)
    y_ref, grads_ref = run(multi_lora_linear_reference, x, W, b, A, Bm, s, coef, ids, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for name, g, gr in zip(["x", "weight", "bias", "lora_a", "lora_b", "coef"], grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=2e-4, msg=lambda m: f"d{name}: {m}")


def test_triton_is_deterministic(monkeypatch):
    monkeypatch.setenv("FASTCP_BACKEND", "triton")
    x, W, b, A, Bm, s = make(6, (5,), 40, 30, 4, 8, seed=1)
    ids = torch.tensor([0, 1, 1, -1, 3, 0])
    dy = torch.randn(6, 5, 30)
    first = run(multi_lora_linear, x, W, b, A, Bm, s, None, ids, dy)
    second = run(multi_lora_linear, x, W, b, A, Bm, s, None, ids, dy)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, c) for a, c in zip(first[1], second[1]))


def test_cpu_inputs_go_to_cpp_unless_triton_is_forced(monkeypatch):
    from fastcp.ops import dispatch
    from fastcp.ops.backends.base import LoraProblem

    monkeypatch.delenv("FASTCP_BACKEND", raising=False)
    x, W, b, A, Bm, s = make(2, (), 8, 6, 2, 2, seed=0)
    p = LoraProblem(x, W, b, A, Bm, s, "all")
    assert dispatch.choose(p).name != "triton"
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
