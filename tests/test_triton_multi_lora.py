"""Triton backend of the fused multi-LoRA op against the reference: forward and every gradient it returns.

Without CUDA the kernels run on CPU in the Triton interpreter (fp32 only: its 16-bit tl.dot is wrong);
TRITON_INTERPRET must be set before triton is first imported, hence the line above the imports (the
conftest sets it too, for modules that import triton earlier). Each interpreted launch costs real time, so
the cases are few and small except one odd-size case; sizes are chosen so that some adapter spans
several row tiles (16 rows in the interpreter) and several split-K items (32 rows), which exercises the
fixed-order reductions.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastcp.ops.backends.base import LoraProblem  # noqa: E402
from fastcp.ops.dispatch import get_backend  # noqa: E402
from fastcp.ops.reference import multi_lora_linear_reference  # noqa: E402

BE = get_backend("triton")
pytestmark = pytest.mark.skipif(BE.unavailable_reason() is not None, reason=f"triton: {BE.unavailable_reason()}")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    # CPU tensors reach the interpreter only when the backend is forced (see TritonBackend.refuse)
    monkeypatch.setenv("FASTCP_BACKEND", "triton")
    # dB from the dy pass's per-tile partials (its cost rule would send most interpreter-sized cases to the
    # split-K outer path, which test_strided_operands_no_bias_and_db_through_split_k covers)
    from fastcp.kernels import multi_lora as kern

    monkeypatch.setattr(kern, "DB_PATH", "dy_pass")


def make_problem(M, inn, out, K, r, mode, seed, *, bias=True, strided=False):
    """A LoraProblem with fp32 data; routed ids contain -1 and leave adapter 1 (when K > 1) without rows;
    dense gates contain a row of zeros and a column of zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, inn, generator=g)
    W = torch.randn(out, inn, generator=g) / inn**0.5
    b = torch.randn(out, generator=g) if bias else None
    A = torch.randn(K, r, inn, generator=g) / inn**0.5
    Bm = torch.randn(K, out, r, generator=g)
    s = torch.rand(K, generator=g) + 0.5
    if strided:
        # the kernels address every operand through its strides: store W, A, B transposed and pass views
        W = W.t().contiguous().t()
        A = A.transpose(1, 2).contiguous().transpose(1, 2)
        Bm = Bm.transpose(1, 2).contiguous().transpose(1, 2)
    ids = gates = None
    if mode == "routed":
        # adapter 0 gets many rows (several tiles / splits), 1 none, the rest spread; every 5th row base-only
        ids = torch.tensor([-1 if m % 5 == 4 else (0 if m % 2 == 0 or K < 3 else 2 + m % (K - 2)) for m in range(M)],
                           dtype=torch.int32)
    elif mode == "dense":
        gates = torch.randn(M, K, generator=g)
        gates[1] = 0            # a base-only row
        gates[:, -1] = 0        # an adapter switched off everywhere
    to = dict(device=DEV)
    p = LoraProblem(x.to(**to), W.to(**to), None if b is None else b.to(**to), A.to(**to), Bm.to(**to), s.to(**to),
                    mode, None if ids is None else ids.to(**to), None if gates is None else gates.to(**to))
    return p


def reference_grads(p: LoraProblem, dy):
    """y and (dx, dA, dB, dg) from autograd of the reference, rows treated as samples."""
    x, A, Bm = (t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b))
    leaves = [x, A, Bm]
    coef = ids = None
    if p.mode == "dense":
        coef = p.row_gates.detach().clone().requires_grad_()
        leaves.append(coef)
    elif p.mode == "all":
        # "all" is dense with gates 1: the gradient with respect to those gates is what the backend returns
        coef = torch.ones(p.x.shape[0], p.lora_a.shape[0], device=p.x.device, requires_grad=True)
        leaves.append(coef)
    else:
        ids = p.row_ids.long()
    y = multi_lora_linear_reference(x, p.weight, p.bias, A, Bm, p.scale, coef=coef, adapter_ids=ids)
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), (grads + (None,))[:4]


CASES = [
    # (M, in, out, K, r, mode)
    (7, 31, 25, 1, 1, "all"),
    (13, 24, 20, 3, 3, "all"),
    (9, 20, 18, 16, 16, "all"),       # stacked rank 256
    (37, 310, 250, 3, 3, "routed"),   # odd sizes, several tiles
    (85, 40, 33, 16, 16, "routed"),   # adapter 0: 34 rows = 3 tiles, 2 splits; adapter 1 empty
    (21, 24, 20, 1, 16, "routed"),
    (23, 24, 20, 3, 3, "dense"),
    (19, 17, 19, 16, 1, "dense"),
    (40, 20, 36, 3, 16, "dense"),     # stacked rank 48 -> padded to 64; 2 tiles, 2 splits
]


@pytest.mark.parametrize("M,inn,out,K,r,mode", CASES)
def test_forward_and_gradients_match_reference(M, inn, out, K, r, mode):
    p = make_problem(M, inn, out, K, r, mode, seed=M * 31 + K)
    dy = torch.randn(M, out, generator=torch.Generator().manual_seed(7)).to(DEV)
    y = BE.forward(p)
    dx, da, db, dg = BE.backward(p, dy, True, True, True, True)
    y_ref, (dx_ref, da_ref, db_ref, dg_ref) = reference_grads(p, dy)
    tol = dict(rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol, msg=lambda m: f"dx: {m}")
    torch.testing.assert_close(da, da_ref, **tol, msg=lambda m: f"dA: {m}")
    torch.testing.assert_close(db, db_ref, **tol, msg=lambda m: f"dB: {m}")
    if mode == "routed":
        assert dg is None
        # adapters without rows get exactly zero gradients (written by the reduction, not left uninitialised)
        used = set(p.row_ids.tolist())
        for k in range(K):
            if k not in used:
                assert torch.count_nonzero(da[k]) == 0 and torch.count_nonzero(db[k]) == 0
    else:
        torch.testing.assert_close(dg, dg_ref, **tol, msg=lambda m: f"dg: {m}")


def test_strided_operands_no_bias_and_db_through_split_k(monkeypatch):
    """Non-contiguous W, A, B views; no bias; dB through the split-K outer kernel (the path "auto" takes
    when per-tile partials in the dy pass would move more bytes than a second read of dy)."""
    from fastcp.kernels import multi_lora as kern

    monkeypatch.setattr(kern, "DB_PATH", "outer")
    for mode, K in (("routed", 3), ("dense", 2)):
        p = make_problem(35, 26, 22, K, 3, mode, seed=5, bias=False, strided=True)
        assert not p.weight.is_contiguous() and not p.lora_b.is_contiguous()
        dy = torch.randn(35, 22, generator=torch.Generator().manual_seed(3)).to(DEV)
        y = BE.forward(p)
        dx, da, db, dg = BE.backward(p, dy, True, True, True, True)
        y_ref, (dx_ref, da_ref, db_ref, dg_ref) = reference_grads(p, dy)
        for name, a, e in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref),
                           ("dg", dg, dg_ref)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=2e-4, msg=lambda m, name=name: f"{mode} {name}: {m}")


def test_db_path_cost_rule(monkeypatch):
    from fastcp.kernels import multi_lora as kern

    monkeypatch.setattr(kern, "DB_PATH", "auto")
    M, OUT = 16384, 320
    assert kern.db_in_dy_pass(M, OUT, 8, 2, block_m=64)        # bf16, r=8: partials are cheaper
    # bf16, r=16 (16 adapters routed): the partials move exactly the bytes of the dy read they save; the
    # grid's surplus items (one per segment) must not tip it to a third read of dy
    assert kern.db_in_dy_pass(M, OUT, 16, 2, block_m=64)
    assert kern.db_in_dy_pass(M, OUT, 32, 4, block_m=64)       # fp32, r=32
    assert not kern.db_in_dy_pass(M, OUT, 64, 2, block_m=64)   # r=64: re-reading dy is cheaper
    assert not kern.db_in_dy_pass(M, OUT, 32, 2, block_m=64)   # bf16, stacked K·r=32
    assert not kern.db_in_dy_pass(10**7, 4096, 16, 4, block_m=64)  # partials over the memory budget
    monkeypatch.setattr(kern, "DB_PATH", "sideways")
    with pytest.raises(ValueError, match="DB_PATH"):
        kern.db_in_dy_pass(1, 1, 1, 1)


def test_only_requested_gradients_are_computed():
    p = make_problem(18, 20, 16, 3, 2, "dense", seed=2)
    dy = torch.randn(18, 16, generator=torch.Generator().manual_seed(1)).to(DEV)
    _, (dx_ref, da_ref, db_ref, dg_ref) = reference_grads(p, dy)
    dx, da, db, dg = BE.backward(p, dy, False, False, True, False)
    assert dx is None and da is None and dg is None
    torch.testing.assert_close(db, db_ref, rtol=1e-4, atol=2e-4)
    dx, da, db, dg = BE.backward(p, dy, False, True, False, True)
    assert dx is None and db is None
    torch.testing.assert_close(da, da_ref, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("M", [0, 5])
def test_empty_batch_and_all_rows_base_only(M):
    g = torch.Generator().manual_seed(M)
    x, W, dy = torch.randn(M, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(M, 6, generator=g)
    A, Bm = torch.randn(2, 3, 8, generator=g), torch.randn(2, 6, 3, generator=g)
    p = LoraProblem(*(t.to(DEV) for t in (x, W)), None, A.to(DEV), Bm.to(DEV), torch.ones(2, device=DEV), "routed",
                    torch.full((M,), -1, dtype=torch.int32, device=DEV))
    torch.testing.assert_close(BE.forward(p).cpu(), x @ W.T)
    dx, da, db, dg = BE.backward(p, dy.to(DEV), True, True, True, True)
    torch.testing.assert_close(dx.cpu(), dy @ W)
    assert dg is None and torch.count_nonzero(da) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("mode", ["routed", "dense"])
def test_two_runs_are_bit_identical(mode):
    p = make_problem(75, 40, 30, 4, 8, mode, seed=1)
    dy = torch.randn(75, 30, generator=torch.Generator().manual_seed(4)).to(DEV)
    first = (BE.forward(p),) + BE.backward(p, dy, True, True, True, True)
    second = (BE.forward(p),) + BE.backward(p, dy, True, True, True, True)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


def test_refusals_name_the_problem(monkeypatch):
    from fastcp.ops.backends.base import DispatchKey

    key = DispatchKey(DEV, torch.float32, "all", 2, "triton")
    assert BE.refuse(key) == []
    half = DispatchKey(DEV, torch.float16, "all", 2, "triton")
    if DEV == "cpu":
        assert any("float32" in r or "dtype" in r for r in BE.refuse(half))
        assert any("FASTCP_BACKEND=triton" in r for r in BE.refuse(DispatchKey(DEV, torch.float32, "all", 2, None)))
    else:
        assert BE.refuse(half) == []


def test_dispatch_runs_triton_end_to_end_with_dcoef():
    """FASTCP_BACKEND=triton through the public op: 3-D x, per-sample coef and adapter ids, all gradients."""
    from fastcp.ops import dispatch, multi_lora_linear

    g = torch.Generator().manual_seed(11)
    Bsz, L, inn, out, K, r = 3, 5, 18, 14, 3, 4
    x, W, b = torch.randn(Bsz, L, inn, generator=g), torch.randn(out, inn, generator=g), torch.randn(out, generator=g)
    A, Bm = torch.randn(K, r, inn, generator=g), torch.randn(K, out, r, generator=g)
    scaling = torch.tensor([0.5, 1.0, 2.0])
    dy = torch.randn(Bsz, L, out, generator=g)
    p = LoraProblem(x.reshape(-1, inn), W, b, A, Bm, scaling, "all")
    assert dispatch.choose(p).name == "triton"
    for kw in (dict(coef=torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [2.0, -1.0, 0.0]])),
               dict(adapter_ids=torch.tensor([2, -1, 0]))):
        results = []
        for fn in (multi_lora_linear, multi_lora_linear_reference):
            leaves = [t.clone().to(DEV).requires_grad_() for t in (x, W, b, A, Bm)]
            coef = kw["coef"].clone().to(DEV).requires_grad_() if "coef" in kw else None
            ids = kw["adapter_ids"].to(DEV) if "adapter_ids" in kw else None
            y = fn(*leaves, scaling.to(DEV), coef=coef, adapter_ids=ids)
            results.append((y,) + torch.autograd.grad(y, leaves + ([coef] if coef is not None else []), dy.to(DEV)))
        for name, a, e in zip(["y", "x", "weight", "bias", "lora_a", "lora_b", "coef"], *results):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=2e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-bit tl.dot needs a GPU (the interpreter's is wrong)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["routed", "dense", "all"])
def test_16bit_on_gpu_close_to_fp32_reference(dtype, mode):
    """bf16/fp16 operands with fp32 accumulation: relative error (Frobenius) of y and every gradient against
    the fp32 reference on the same rounded inputs, at a size where autotuning has real choices."""
    p32 = make_problem(1000, 320, 320, 4, 16, mode, seed=3)
    p = LoraProblem(*(t.to(dtype) for t in (p32.x, p32.weight, p32.bias, p32.lora_a, p32.lora_b)), p32.scale,
                    mode, p32.row_ids, None if p32.row_gates is None else p32.row_gates.to(dtype))
    ref = LoraProblem(*(t.float() for t in (p.x, p.weight, p.bias, p.lora_a, p.lora_b)), p.scale, mode, p.row_ids,
                      None if p.row_gates is None else p.row_gates.float())
    dy = torch.randn(1000, 320, device=DEV).to(dtype)
    y = BE.forward(p)
    grads = BE.backward(p, dy, True, True, True, True)
    y_ref, grads_ref = reference_grads(ref, dy.float())
    for name, a, e in zip(["y", "dx", "dA", "dB", "dg"], (y,) + grads, (y_ref,) + grads_ref):
        if e is None:
            continue
        assert a.dtype == dtype
        err = ((a.float() - e).norm() / e.norm().clamp_min(1e-6)).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
