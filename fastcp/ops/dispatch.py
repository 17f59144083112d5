"""Backend selection for the fused ops, resolved once per (device, dtype, mode, rank) and cached.

Order of preference: triton, cuda, cpp, reference. On a GPU Triton comes first: its kernels are
fused, sync-free and registered with torch.library (compile, CUDA graphs); the CUDA SGMV backend
(scalar kernels, a host-syncing ATen backward) follows until ``benchmarks/gpu_suite.py`` measures
it ahead. Each backend declares whether it can run in this process (``unavailable_reason``) and
whether it accepts a kind of input (``refuse``, on a ``DispatchKey``: device type, dtype, mode,
rank, forced name); the first one with no reasons runs. ``backend=`` of ``multi_lora_linear`` or
``FASTCP_BACKEND=reference|cpp|triton|cuda`` forces one. If every backend refuses, the error lists
each one's reasons. Importing fastcp never fails because an optional backend is missing: a backend
whose import fails is reported as unavailable with the reason.

The resolution is cached per key, so a layer call costs a dict lookup, not a walk over the
backends (``clear_cache()`` after changing what is available, e.g. in tests).
"""
from __future__ import annotations

import importlib
import os

import torch

from fastcp.ops.backends.base import Backend, DispatchKey, LoraProblem

ORDER = ["triton", "cuda", "cpp", "reference"]
_SPECS = {
    "cuda": ("fastcp.ops.backends.cuda", "CudaBackend"),
    "triton": ("fastcp.ops.backends.triton", "TritonBackend"),
    "cpp": ("fastcp.ops.backends.cpp", "CppBackend"),
    "reference": ("fastcp.ops.backends.reference", "ReferenceBackend"),
}
_CACHE: dict[str, Backend] = {}
_RESOLVED: dict[DispatchKey, Backend] = {}


class _Unavailable(Backend):
    def __init__(self, name: str, reason: str):
        self.name, self._reason = name, reason

    def unavailable_reason(self):
        return self._reason


def get_backend(name: str) -> Backend:
    """The backend object of ``name`` (an unavailable stand-in if its module fails to import)."""
    if name not in _CACHE:
        spec = _SPECS.get(name)
        if spec is None:
            raise ValueError(f"backend: unknown backend {name!r}; known: {', '.join(ORDER)}")
        try:
            _CACHE[name] = getattr(importlib.import_module(spec[0]), spec[1])()
        except Exception as exc:  # an optional dependency missing or broken: say why, never fail import
            _CACHE[name] = _Unavailable(name, f"cannot import: {type(exc).__name__}: {exc}")
    return _CACHE[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, in order of preference."""
    return [name for name in ORDER if get_backend(name).unavailable_reason() is None]


def forced_backend(backend: str | None = None) -> str | None:
    """The backend forced by the argument, else by FASTCP_BACKEND, else None."""
    return backend or os.environ.get("FASTCP_BACKEND") or None


def resolve(device_type: str, dtype: torch.dtype, mode: str, rank: int, backend: str | None = None) -> Backend:
    """The backend that runs inputs of this kind (cached per key)."""
    forced = forced_backend(backend)
    key = DispatchKey(device_type, dtype, mode, int(rank), forced)
    be = _RESOLVED.get(key)
    if be is not None:
        return be
    names = [forced] if forced else ORDER
    reasons = {}
    for name in names:
        cand = get_backend(name)
        why = cand.unavailable_reason()
        r = [why] if why else cand.refuse(key)
        if not r:
            _RESOLVED[key] = cand
            return cand
        reasons[name] = r
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise RuntimeError(f"multi_lora_linear: no backend accepts this input ({detail})")


def choose(p: LoraProblem, backend: str | None = None) -> Backend:
    """The backend that runs ``p``."""
    return resolve(p.x.device.type, p.x.dtype, p.mode, p.lora_a.shape[1], backend)


def clear_cache() -> None:
    """Forget resolved choices (and backend objects): the next call resolves again."""
    _RESOLVED.clear()
    _CACHE.clear()
