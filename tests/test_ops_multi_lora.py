"""fastcp.ops: every available backend against the plain-torch reference, forward and all gradients."""
import pytest
import torch

from fastcp.ops import available_backends, magmax_merge, merge_lora_, multi_lora_linear, unmerge_lora_
from fastcp.ops.reference import multi_lora_linear_reference

BACKENDS = [b for b in available_backends() if b in ("reference", "cpp")]  # triton: tests/test_triton_*.py


def make(B, mid, inn, out, K, r, *, seed=0, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *mid, inn, generator=g, dtype=dtype)
    W = torch.randn(out, inn, generator=g, dtype=dtype) / inn**0.5
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    A = torch.randn(K, r, inn, generator=g, dtype=dtype) / inn**0.5
    Bm = torch.randn(K, out, r, generator=g, dtype=dtype)
    scaling = torch.rand(K, generator=g, dtype=torch.float32) + 0.5
    return x, W, b, A, Bm, scaling


def check(backend, monkeypatch, x, W, b, A, Bm, scaling, *, coef=None, adapter_ids=None, grads=True):
    monkeypatch.setenv("FASTCP_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_(grads) if t is not None else None for t in (x, W, b, A, Bm, coef)]
    ref_leaves = [t.detach().clone().requires_grad_(grads) if t is not None else None for t in (x, W, b, A, Bm, coef)]
    y = multi_lora_linear(*leaves[:5], scaling, coef=leaves[5], adapter_ids=adapter_ids)
    y_ref = multi_lora_linear_reference(*ref_leaves[:5], scaling, coef=ref_leaves[5], adapter_ids=adapter_ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    if not grads:
        return
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    want = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], dy)
    names = [n for n, t in zip(["x", "weight", "bias", "lora_a", "lora_b", "coef"], leaves) if t is not None]
    for n, a, c in zip(names, got, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,r", [(1, 1), (3, 3), (16, 8), (5, 16)])
def test_routed_with_base_only_rows_and_empty_adapters(backend, monkeypatch, K, r):
    x, W, b, A, Bm, s = make(7, (3,), 310, 250, K, r, seed=K * 31 + r)
    ids = torch.tensor([0, -1, K - 1, 0, -1, K // 2, K - 1])  # some adapters get no rows at all
    check(backend, monkeypatch, x, W, b, A, Bm, s, adapter_ids=ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,r", [(1, 4), (4, 3), (16, 1)])
def test_dense_coef_with_zeros(backend, monkeypatch, K, r):
    x, W, b, A, Bm, s = make(5, (2, 3), 33, 17, K, r, seed=K + r)
    coef = torch.randn(5, K)
    coef[1] = 0  # a base-only sample
    coef[:, 0] = 0  # an adapter off everywhere
    check(backend, monkeypatch, x, W, b, A, Bm, s, coef=coef)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_adapters_no_bias_float_scaling_2d(backend, monkeypatch):
    x, W, _, A, Bm, _ = make(9, (), 20, 12, 3, 2, bias=False)
    check(backend, monkeypatch, x, W, None, A, Bm, 0.75)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend, monkeypatch):
    x, W, b, A, Bm, s = make(4, (6,), 40, 24, 2, 4)
    xt = torch.randn(4, 40, 6).transpose(1, 2)  # non-contiguous [4, 6, 40]
    assert not xt.is_contiguous()
    check(backend, monkeypatch, xt, W, b, A, Bm, s, adapter_ids=torch.tensor([1, 0, -1, 1]))


def test_reference_gradcheck_float64():
    x, W, b, A, Bm, s = make(2, (3,), 5, 4, 2, 2, dtype=torch.float64)
    coef = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    ins = [t.requires_grad_() for t in (x, W, b, A, Bm)]
    assert torch.autograd.gradcheck(lambda *a: multi_lora_linear_reference(*a[:5], s.double(), coef=a[5]), (*ins, coef))


def test_bad_input_names_the_argument():
    x, W, b, A, Bm, s = make(2, (), 8, 6, 2, 2)
    with pytest.raises(ValueError, match="lora_b"):
        multi_lora_linear(x, W, b, A, Bm[:, :5], s)
    with pytest.raises(ValueError, match="adapter_ids"):
        multi_lora_linear(x, W, b, A, Bm, s, adapter_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="coef"):
        multi_lora_linear(x, W, b, A, Bm, s, coef=torch.ones(2, 3))
    with pytest.raises(ValueError, match="weight"):
        multi_lora_linear(x, W[:, :7], b, A, Bm, s)


def test_forced_backend_refusal_lists_reasons(monkeypatch):
    x, W, b, A, Bm, s = make(2, (), 8, 6, 2, 2)
    monkeypatch.setenv("FASTCP_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="no backend accepts this input.*cuda"):
        multi_lora_linear(x, W, b, A, Bm, s)
    assert "reference" in available_backends()


def test_merge_unmerge_round_trip_and_mask():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(25, 31, generator=g)
    A, Bm = torch.randn(4, 31, generator=g), torch.randn(25, 4, generator=g)
    W0 = W.clone()
    merge_lora_(W, A, Bm, 0.5)
    torch.testing.assert_close(W, W0 + 0.5 * Bm @ A)
    unmerge_lora_(W, A, Bm, 0.5)
    torch.testing.assert_close(W, W0, rtol=0, atol=1e-6)
    mask = (torch.rand(25, 31, generator=g) > 0.5).float()
    before = W.clone()
    merge_lora_(W, A, Bm, 2.0, mask=mask)
    assert torch.equal(W[mask == 0], before[mask == 0])
    torch.testing.assert_close(W[mask == 1], (before + 2.0 * Bm @ A)[mask == 1])
    with pytest.raises(ValueError, match="lora_a"):
        merge_lora_(W, A[:, :5], Bm, 1.0)


def test_magmax_picks_largest_magnitude():
    t1 = torch.tensor([1.0, -3.0, 0.5, 2.0])
    t2 = torch.tensor([-2.0, 1.0, 0.25, -2.0])
    assert torch.equal(magmax_merge([t1, t2]), torch.tensor([-2.0, -3.0, 0.5, 2.0]))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="fastcp._C not built")
def test_cpp_routed_parallel_groups_match_serial(monkeypatch):
    # With >= as many non-empty adapter groups as threads, the C++ routed op runs the groups under
    # at::parallel_for; results must equal the reference and the single-thread run bit for bit.
    x, W, b, A, Bm, s = make(32, (5,), 48, 40, 16, 4, seed=3)
    ids = torch.arange(32) % 17 - 1  # every adapter busy, plus base-only samples
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        check("cpp", monkeypatch, x, W, b, A, Bm, s, adapter_ids=ids)
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, Bm)]
        y2 = multi_lora_linear(leaves[0], W, b, leaves[1], leaves[2], s, adapter_ids=ids)
        g2 = torch.autograd.grad(y2.square().sum(), leaves)
        torch.set_num_threads(1)
        y1 = multi_lora_linear(leaves[0], W, b, leaves[1], leaves[2], s, adapter_ids=ids)
        g1 = torch.autograd.grad(y1.square().sum(), leaves)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)  # dx's base GEMM may block differently


@pytest.mark.skipif("cpp" not in BACKENDS, reason="fastcp._C not built")
@pytest.mark.parametrize("mode", ["routed", "dense"])
def test_cpp_bfloat16_close_to_fp32_reference(monkeypatch, mode):
    x, W, b, A, Bm, s = make(6, (4,), 64, 48, 3, 8, seed=5)
    kw = {"adapter_ids": torch.tensor([0, 2, -1, 1, 2, 0])} if mode == "routed" else {"coef": torch.rand(6, 3)}
    monkeypatch.setenv("FASTCP_BACKEND", "cpp")
    bf = [t.bfloat16() for t in (x, W, b, A, Bm)]
    kw_bf = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in kw.items()}
    y = multi_lora_linear(*bf, s, **kw_bf)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), multi_lora_linear_reference(x, W, b, A, Bm, s, **kw), rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize("mode", ["routed", "dense"])
def test_cpp_ops_trace_under_torch_compile(monkeypatch, mode):
    """The C++ ops have fake kernels: torch.compile traces forward and backward through them."""
    if "cpp" not in available_backends():
        pytest.skip("cpp backend not built")
    monkeypatch.setenv("FASTCP_BACKEND", "cpp")
    x, W, b, A, Bm, s = make(4, (3,), 16, 12, 3, 2)
    kw = {"adapter_ids": torch.tensor([0, -1, 2, 1])} if mode == "routed" else {"coef": torch.rand(4, 3)}

    def step(x, A, Bm):
        return multi_lora_linear(x, W, b, A, Bm, s, **kw).square().sum()

    leaves = [t.clone().requires_grad_() for t in (x, A, Bm)]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    got = torch.autograd.grad(out, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, A, Bm)]
    ref = multi_lora_linear_reference(ref_leaves[0], W, b, ref_leaves[1], ref_leaves[2], s, **kw).square().sum()
    want = torch.autograd.grad(ref, ref_leaves)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
