"""Test-session setup shared by every test file."""
import os

# Triton reads TRITON_INTERPRET when it is first imported (torch and diffusers import it early),
# so it has to be set before any test module loads. Without a GPU the Triton kernels then run on
# CPU tensors in the interpreter; dispatch still sends CPU inputs to cpp unless a test forces
# FASTCP_BACKEND=triton.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
