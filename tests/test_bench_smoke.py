"""The microbenchmarks run (CPU, tiny config) and write well-formed rows. No speed assertions."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_multi_lora_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "bench_multi_lora.py"), "--quick", "--reps", "1",
                           "--shapes", "attn-64", "--out_dir", str(tmp_path), "--out", "smoke"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert (tmp_path / "smoke.csv").read_text().startswith("op,")
    timed = [r for r in rows if r["op"] == "multi_lora_linear"]
    goals = [r for r in rows if r["op"] == "goal"]
    providers = {r["provider"] for r in timed}
    assert {"bare_gemm", "peft", "addmm_", "reference", "cpp"} <= providers
    assert {r["case"] for r in timed} == {"k1", "single", "routed", "routed_unsorted", "stacked", "dense"}
    for r in timed:
        assert r["mode"] in ("fwd", "fwd+bwd") and r["timing"] == "eager"  # no CUDA graphs on the CPU
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["ratio_to_bare_gemm"] > 0 and r["device"] and r["commit"]
    # every section-8 ratio is there, for both fastcp CPU backends, both modes
    names = {(g["goal"].split(" (")[0], g["provider"], g["mode"]) for g in goals}
    for prov in ("reference", "cpp"):
        for mode in ("fwd", "fwd+bwd"):
            for goal in ("routed / single", "routed_unsorted / single", "dense / stacked", "peft mixed batch / routed"):
                assert (goal, prov, mode) in names, (goal, prov, mode)
        assert ("fused K=1 fwd / bare GEMM", prov, "fwd") in names
        assert ("fused K=1 fwd+bwd, W frozen / frozen base", prov, "fwd+bwd") in names
    assert all(g["ratio"] > 0 for g in goals)
