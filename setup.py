"""Builds the C++/CUDA extension ``fastcp._C`` and installs ``kernels/`` as ``fastcp.kernels``.

CPU kernels in ``csrc/*.cpp`` are always built. CUDA kernels (``csrc/*.cu`` plus their
``*_cuda.cpp`` bindings) are built only where a CUDA torch and nvcc exist, or when
``FASTCP_BUILD_CUDA=1`` forces it.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError as exc:  # pragma: no cover - build requirement
    raise SystemExit("fastcp: torch must be installed before building (pip install torch==2.13.0)") from exc


def _want_cuda() -> bool:
    forced = os.environ.get("FASTCP_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


here = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(
    os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")) if not p.endswith("_cuda.cpp")
)
cxx_flags = ["-O3", "-std=c++17"]
if os.environ.get("FASTCP_NO_OPENMP") != "1":
    cxx_flags.append("-fopenmp")

if _want_cuda():
    cuda_sources = sorted(
        os.path.relpath(p, here)
        for p in glob.glob(os.path.join(here, "csrc", "*.cu")) + glob.glob(os.path.join(here, "csrc", "*_cuda.cpp"))
    )
    ext = CUDAExtension(
        "fastcp._C",
        cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DFASTCP_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17", "-DFASTCP_WITH_CUDA"]},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )
else:
    ext = CppExtension(
        "fastcp._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )

setup(
    packages=find_packages(include=["fastcp", "fastcp.*"]) + ["fastcp.kernels"],
    package_dir={"fastcp.kernels": "kernels"},
    package_data={"fastcp.models": ["tiny/**/*", "tiny/*"]},
    include_package_data=True,
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
