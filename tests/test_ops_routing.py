"""Routing plans: bounds and order built on the device once, validation, reuse by every layer, and the
Triton kernels reading a plan with L > 1 rows per sample (grouped by sort, or presorted in place)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from fastcp.nn import MultiLoRALinear, lora_routing  # noqa: E402
from fastcp.ops import available_backends, multi_lora_linear, routing_plan  # noqa: E402
from fastcp.ops.reference import multi_lora_linear_reference  # noqa: E402


def test_routed_plan_groups_samples_stably_with_base_only_last():
    ids = torch.tensor([2, -1, 0, 2, 0, -1, 3])
    p = routing_plan(7, 4, adapter_ids=ids)
    assert p.mode == "routed" and not p.stacked
    assert p.bounds.tolist() == [0, 2, 2, 4, 5, 7]  # adapter 0: 2 samples, 1: none, 2: 2, 3: 1, base-only: 2
    assert p.order.tolist() == [2, 4, 0, 3, 6, 1, 5]  # stable within each adapter
    assert p.row_ids(3).tolist() == [i for i in ids.tolist() for _ in range(3)]
    g = p.row_gates(2, torch.float32)
    assert g.shape == (14, 4) and g[0].tolist() == [0, 0, 1, 0] and g[2].sum() == 0  # id -1: zero gates


def test_presorted_plan_skips_the_sort():
    p = routing_plan(5, 3, adapter_ids=torch.tensor([0, 0, 2, -1, -1]), presorted=True)
    assert p.order is None and p.bounds.tolist() == [0, 2, 2, 3, 5]


def test_plan_validation_names_the_argument():
    with pytest.raises(ValueError, match="adapter_ids"):
        routing_plan(2, 2, adapter_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="adapter_ids"):
        routing_plan(2, 2, adapter_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="coef"):
        routing_plan(2, 2, coef=torch.ones(2, 3))
    with pytest.raises(ValueError, match="not both"):
        routing_plan(2, 2, coef=torch.ones(2, 2), adapter_ids=torch.tensor([0, 1]))
    x, W, A, B = torch.randn(3, 4, 8), torch.randn(6, 8), torch.randn(2, 2, 8), torch.randn(2, 6, 2)
    with pytest.raises(ValueError, match="plan"):
        multi_lora_linear(x, W, None, A, B, 1.0, plan=routing_plan(2, 2, adapter_ids=torch.tensor([0, 1])))


def test_lora_routing_builds_one_plan_and_direct_attributes_drop_it():
    layers = [MultiLoRALinear(nn.Linear(8, 6), num_adapters=3, rank=2) for _ in range(4)]
    ids = torch.tensor([1, -1])
    with lora_routing(layers, adapter_ids=ids) as plans:
        assert list(plans) == [3]
        assert all(l.plan is plans[3] for l in layers)  # one plan for every layer
        with lora_routing(layers, adapter_ids=ids, plans=plans) as again:
            assert again[3] is plans[3]  # reused, not rebuilt
        layers[0].coef = torch.rand(2, 3)  # what FL2T does per layer
        assert layers[0].plan is None and layers[0].adapter_ids is ids
    assert all(l.plan is None and l.adapter_ids is None and l.coef is None for l in layers)


@pytest.mark.skipif("triton" not in available_backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("kind", ["routed", "presorted", "dense"])
def test_triton_reads_plans_with_several_rows_per_sample(kind):
    g = torch.Generator().manual_seed(5)
    Bsz, L, inn, out, K, r = 6, 7, 24, 20, 3, 4
    x, W, b = torch.randn(Bsz, L, inn, generator=g), torch.randn(out, inn, generator=g), torch.randn(out, generator=g)
    A, Bm = torch.randn(K, r, inn, generator=g), torch.randn(K, out, r, generator=g)
    s = torch.tensor([0.5, 1.0, 2.0])
    kw = {"routed": dict(adapter_ids=torch.tensor([2, -1, 0, 2, 1, 0])),
          "presorted": dict(adapter_ids=torch.tensor([0, 0, 1, 2, 2, -1])),
          "dense": dict(coef=torch.randn(Bsz, K, generator=g))}[kind]
    dy = torch.randn(Bsz, L, out, generator=g)
    results = []
    for backend in ("triton", None):
        leaves = [t.clone().requires_grad_() for t in (x, W, b, A, Bm)]
        coef = kw["coef"].clone().requires_grad_() if "coef" in kw else None
        if backend is None:
            y = multi_lora_linear_reference(*leaves, s, coef=coef, adapter_ids=kw.get("adapter_ids"))
        else:
            plan = routing_plan(Bsz, K, coef=coef, adapter_ids=kw.get("adapter_ids"), presorted=kind == "presorted")
            assert (plan.order is None) == (kind != "routed")
            y = multi_lora_linear(*leaves, s, plan=plan, backend="triton")
        results.append((y,) + torch.autograd.grad(y, leaves + ([coef] if coef is not None else []), dy))
    for name, a, e in zip(["y", "x", "weight", "bias", "lora_a", "lora_b", "coef"], *results):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=2e-4, msg=lambda m, name=name: f"{kind} {name}: {m}")
