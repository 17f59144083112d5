"""Every .cu file compiles with a bare `nvcc -c` (no torch headers), where nvcc exists."""
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/ must hold the CUDA kernels"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed on this machine")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_with_bare_nvcc(cu, tmp_path):
    proc = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-std=c++17", str(cu), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


def test_cuda_backend_reports_why_it_is_unavailable():
    import torch

    from fastcp.ops.dispatch import get_backend

    reason = get_backend("cuda").unavailable_reason()
    if not torch.cuda.is_available():
        assert reason == "no CUDA device"
