"""bench_dc runs on the CPU (tiny backbone, tiny sizes) and writes well-formed rows. No speed assertions."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_dc_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "bench_dc.py"), "--images", "1",
                           "--concepts", "2", "--timesteps", "2", "--reps", "1", "--out_dir", str(tmp_path),
                           "--out", "smoke", "--channels_last"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"loop", "batched", "batched_no_kv", "batched_plain", "batched+cl"}
    for r in rows:
        assert r["passes"] == 4 and r["passes_per_s"] > 0 and r["model"] == "tiny" and r["device"]
        assert 0 < r["gflop_executed_per_pass"] <= r["gflop_per_pass"] * 1.001 and r["tflops_equiv"] > 0 and r["peak_frac"] is None  # no GPU peak on CPU
