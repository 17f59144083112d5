"""CUDA backend: ``fastcp._C`` CUDA kernels (csrc/sgmv.cu + csrc/sgmv_cuda.cpp).

Available only when the extension was built with CUDA (a CUDA torch and nvcc at install time);
it then takes CUDA inputs with ranks up to 64 and reuses the cpp backend's registered ops (fake
kernels, autograd), which the dispatcher routes to the CUDA registrations.

Why it comes after Triton in dispatch: its routed forward is a scalar SGMV (one block per row, no
tensor cores) and its backward is the ATen composition of multi_lora_cpu.cpp, which reads the
adapter group sizes on the host (a device→host sync per layer). It stays as a second opinion the
GPU suite measures and checks against the reference (``backend="cuda"``); ``benchmarks/gpu_suite.py``
decides whether it ever earns first place.
"""
from __future__ import annotations

import torch

from fastcp.ops.backends.base import DispatchKey, common_refusals
from fastcp.ops.backends.cpp import CppBackend


class CudaBackend(CppBackend):
    name = "cuda"

    def unavailable_reason(self):
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastcp::lora_routed_forward", "CUDA"):
            return "fastcp._C was built without CUDA kernels (reinstall with a CUDA torch and nvcc, or FASTCP_BUILD_CUDA=1)"
        return None

    def refuse(self, key: DispatchKey) -> list[str]:
        reasons = common_refusals(key, devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16))
        if key.rank > 64:
            reasons.append(f"rank {key.rank} > 64 (the SGMV kernels keep a row's rank in registers)")
        return reasons
