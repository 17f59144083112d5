"""Backend selection for the fused ops.

Order of preference: cuda, triton, cpp, reference. Each backend declares whether it can run in
this process (``unavailable_reason``) and whether it accepts an input (``refuse``); the first one
with no reasons runs. ``FASTCP_BACKEND=reference|cpp|triton|cuda`` forces one. If every backend
refuses, the error lists each one's reasons. Importing fastcp never fails because an optional
backend is missing: a backend whose import fails is reported as unavailable with the reason.
"""
from __future__ import annotations

import importlib
import os

from fastcp.ops.backends.base import Backend, LoraProblem

_SPECS = [
    ("cuda", "fastcp.ops.backends.cuda", "CudaBackend"),
    ("triton", "fastcp.ops.backends.triton", "TritonBackend"),
    ("cpp", "fastcp.ops.backends.cpp", "CppBackend"),
    ("reference", "fastcp.ops.backends.reference", "ReferenceBackend"),
]
_CACHE: dict[str, Backend | str] = {}


class _Unavailable(Backend):
    def __init__(self, name: str, reason: str):
        self.name, self._reason = name, reason

    def unavailable_reason(self):
        return self._reason


def get_backend(name: str) -> Backend:
    """The backend object of ``name`` (an unavailable stand-in if its module fails to import)."""
    if name not in _CACHE:
        spec = next((s for s in _SPECS if s[0] == name), None)
        if spec is None:
            raise ValueError(f"backend: unknown backend {name!r}; known: {', '.join(s[0] for s in _SPECS)}")
        try:
            _CACHE[name] = getattr(importlib.import_module(spec[1]), spec[2])()
        except Exception as exc:  # an optional dependency missing or broken: say why, never fail import
            _CACHE[name] = _Unavailable(name, f"cannot import: {type(exc).__name__}: {exc}")
    return _CACHE[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, in order of preference."""
    return [name for name, _, _ in _SPECS if get_backend(name).unavailable_reason() is None]


def choose(p: LoraProblem) -> Backend:
    """The backend that runs ``p`` (forced by FASTCP_BACKEND, else the first that accepts)."""
    forced = os.environ.get("FASTCP_BACKEND")
    names = [forced] if forced else [s[0] for s in _SPECS]
    reasons = {}
    for name in names:
        be = get_backend(name)
        why = be.unavailable_reason()
        r = [why] if why else be.refuse(p)
        if not r:
            return be
        reasons[name] = r
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise RuntimeError(f"multi_lora_linear: no backend accepts this input ({detail})")
