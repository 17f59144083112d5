"""The Triton kernels compile for an H100 (sm_90) without a GPU: the interpreter accepts code that the real
compiler rejects (loop-carried type changes, bad layouts), so CI compiles every kernel to a cubin with
Triton's bundled ptxas (routed: every autotune candidate; dense with K·r = 256: the first two) and checks
that for each variant at least one candidate fits the H100's shared memory (autotune skips the others).

The compile runs in a subprocess: with TRITON_INTERPRET=1 (set for the other tests) @triton.jit returns
interpreter functions that cannot be compiled.
"""
import json
import os
import subprocess
import sys

import pytest

H100_SMEM = 232448  # bytes of shared memory per block on sm_90 (opt-in maximum)


def _compile_all(dtype: str) -> dict:
    """{"kernel variant": [shared bytes of each candidate config]} for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcp.kernels import multi_lora as K

    target = GPUTarget("cuda", 90, 32)
    act = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"
    ptrs = {
        "_shrink_kernel": dict(X=act, P=act, S="*fp32"),
        "_fused_kernel": dict(X=act, W=act, BIAS=act, S="*fp32", Q=act, Y=act, SCALE="*fp32", GATES=act),
        "_dy_pass_kernel": dict(DY=act, B=act, S0="*fp32", U0="*fp32", PART="*fp32", SCALE="*fp32", GATES=act),
        "_outer_kernel": dict(L="*fp32", RT=act, PART="*fp32", SCALE="*fp32", GATES=act),
        "_reduce_kernel": dict(PART="*fp32", OUT=act),
    }
    index = dict(ROWS="*i32", SEG_START="*i32", SEG_END="*i32")
    out = {}
    # (stacked, row gates, padded rank): routed r <= 16, and dense with K·r = 256, the largest tiles
    # (mode "all" is dense minus the row-gate load, a constexpr branch)
    for stacked, row_gates, br in ((False, False, 16), (True, True, 256)):
        flags = dict(STACKED=stacked, GATHER=not stacked, ROW_GATES=row_gates, HAS_BIAS=True, WITH_DB=True,
                     PREC=prec, BLOCK_R=br)
        for name, p in ptrs.items():
            kern = getattr(K, name)
            jit = kern.fn if not isinstance(kern, triton.JITFunction) else kern
            configs = kern.configs if not isinstance(kern, triton.JITFunction) else [
                triton.Config(dict(BLOCK_N=64), num_warps=4, num_stages=1)]
            if name == "_dy_pass_kernel":
                configs = [triton.Config(dict(c.kwargs, BLOCK_M=K.DY_BLOCK_M), num_warps=c.num_warps,
                                         num_stages=c.num_stages) for c in configs]
            if stacked:
                configs = configs[:2]  # the largest tiles compile slowly; all candidates are covered for routed
            shared = []
            for cfg in configs:
                consts = {a: v for a, v in {**flags, **cfg.kwargs}.items() if a in jit.arg_names}
                sig = {a: "constexpr" if a in consts else p.get(a, index.get(a, "i32")) for a in jit.arg_names}
                src = ASTSource(fn=jit, signature=sig, constexprs=consts)
                compiled = triton.compile(src, target=target,
                                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                assert compiled.asm.get("cubin"), f"{name}: no cubin"
                shared.append(compiled.metadata.shared)
            out[f"{name} stacked={stacked} R={br}"] = shared
    return out


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
def test_every_kernel_and_autotune_candidate_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTCP_TRITON_AUTOTUNE"] = "1"
    res = subprocess.run([sys.executable, __file__, "bf16"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(shared) == 10
    for variant, sizes in shared.items():
        assert min(sizes) <= H100_SMEM, f"{variant}: no candidate fits the H100's shared memory: {sizes}"


if __name__ == "__main__":
    print(json.dumps(_compile_all(sys.argv[1] if len(sys.argv) > 1 else "bf16")))
