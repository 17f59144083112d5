"""CUDA backend: ``fastcp._C`` CUDA kernels (csrc/sgmv.cu + csrc/sgmv_cuda.cpp).

Available only when the extension was built with CUDA (a CUDA torch and nvcc at install time);
it then takes CUDA inputs with ranks up to 64 and reuses the cpp backend's op calls, which the
dispatcher routes to the CUDA registrations.
"""
from __future__ import annotations

import torch

from fastcp.ops.backends.base import LoraProblem, common_refusals
from fastcp.ops.backends.cpp import CppBackend


class CudaBackend(CppBackend):
    name = "cuda"

    def unavailable_reason(self):
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fastcp::lora_routed_forward", "CUDA"):
            return "fastcp._C was built without CUDA kernels (reinstall with a CUDA torch and nvcc, or FASTCP_BUILD_CUDA=1)"
        return None

    def refuse(self, p: LoraProblem) -> list[str]:
        reasons = common_refusals(p, devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16))
        if p.lora_a.shape[1] > 64:
            reasons.append(f"rank {p.lora_a.shape[1]} > 64 (the SGMV kernels keep a row's rank in registers)")
        return reasons
