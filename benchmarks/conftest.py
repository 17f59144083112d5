"""pytest-benchmark suites of fastcp (``pytest benchmarks --benchmark-only``); the scripts next to them
(bench_multi_lora.py, bench_dc.py, gpu_suite.py) share their helpers through this folder on sys.path."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # never used for timing here, but keeps imports consistent
