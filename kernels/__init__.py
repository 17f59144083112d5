"""Triton kernels of fastcp (no autograd, no nn: launchers and @triton.jit kernels only).

Installed as ``fastcp.kernels`` through setuptools' package-dir. A bare ``import kernels`` from the
repository root would shadow Hugging Face's ``kernels`` package, so this refuses any other name.
"""
if __name__ != "fastcp.kernels":
    raise ImportError(
        "the Triton kernels of fastcp must be imported as 'fastcp.kernels', not as "
        f"'{__name__}' (install fastcp, then `import fastcp.kernels`)"
    )
