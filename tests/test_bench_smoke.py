"""The microbenchmarks run (CPU, tiny config) and write well-formed rows. No speed assertions."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_multi_lora_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "bench_multi_lora.py"), "--quick", "--reps", "1",
                           "--out_dir", str(tmp_path), "--out", "smoke"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert (tmp_path / "smoke.csv").read_text().startswith("op,")
    providers = {r["provider"] for r in rows}
    assert {"bare_gemm", "peft", "addmm_", "reference", "cpp"} <= providers
    for r in rows:
        assert r["mode"] in ("fwd", "fwd+bwd") and r["case"] in ("k1", "routed", "dense")
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["ratio_to_bare_gemm"] > 0 and r["device"] and r["commit"]
