"""Shared benchmark helpers: timing (CUDA events / wall clock), environment facts, CSV + JSON rows."""
from __future__ import annotations

import csv
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def versions() -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "diffusers", "peft"):
        try:
            v[name] = __import__(name).__version__
        except Exception:
            pass
    return v


def measure(fn, *, warmup: int = 3, reps: int = 20, device: torch.device | None = None) -> dict:
    """p20/p50/p80 milliseconds of ``fn()`` after warm-up (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = device is not None and device.type == "cuda"
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor([0.2, 0.5, 0.8])).tolist()
    return {"p20_ms": q[0], "p50_ms": q[1], "p80_ms": q[2]}


def measure_graph(fn, *, warmup: int = 3, reps: int = 20) -> dict:
    """p20/p50/p80 ms of replaying ``fn`` captured in a CUDA graph: kernel time without launch overhead.

    Warm-up runs on a side stream (as torch.cuda.graphs requires); the capture fails on any host sync."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return measure(graph.replay, warmup=1, reps=reps, device=torch.device("cuda"))


def write_rows(rows: list[dict], stem: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.json`` (rows + environment)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return csv_path, json_path
