"""Everything a GPU must check and measure, in one command, in parts that each fit a 10-minute call.

    python benchmarks/gpu_suite.py --part all                 # on a GPU machine
    python benchmarks/gpu_suite.py --part ops                 # one part
    python benchmarks/gpu_suite.py --part all --cpu-smoke     # every part at toy sizes on the CPU (make test)

Parts:

``build``    build the CUDA extension (``FASTCP_BUILD_CUDA=1 pip install --no-build-isolation -e .``) and check
             which backends load (the cuda backend must, on a GPU); nvcc compiles every .cu bare.
``tests``    every GPU-only test: bf16/fp16 Triton and the cuda backend against the reference, no host sync
             in a UNet step (``torch.cuda.set_sync_debug_mode("error")``), inductor fullgraph compile of a
             LoRA UNet, a training step captured in a CUDA graph, the Triton kernels compiled for sm_90, the
             interpreter/CPU hot-path tests.
``ops``      ``bench_multi_lora.py``: every DESIGN.md section-8 ratio of the fused op, eager and under CUDA
             graphs; the triton-vs-cuda routed timings that decide the default backend order.
``dc``       ``bench_dc.py --sd15``: DC passes/s on the SD 1.5 architecture at 512 px (goal >= 500 at batch
             >= 32) against the per-pass loop and plain diffusers batching; the shared-prefix FLOP share.
``train``    ``python -m fastcp.train`` on an SD-1.5-shaped random pipeline (``sd15.py``), bf16, gradient
             checkpointing, batch 1, 20 steps, 2 concepts, methods naive and dsc; reads device,
             peak_memory_gb and seconds_per_step from each run's ``train_log.json`` (goals: naive < 12 GB,
             dsc < 24 GB; the device must be cuda when a GPU is present).
``generate`` ``bench_generate.py --sd15``: serving K=8 personalized concepts × 2 images (SD 1.5 architecture, 512 px,
             bf16, 10 steps): fastcp.generate's one routed batched pass against diffusers' ``set_adapters`` +
             one pipeline call per concept, the ratio from the same run, and the two agreeing on concept 0.
``compare``  ``python -m fastcp.experiments compare`` at full scale (6 concepts, 400 steps, 3 seeds). Runs are
             resumable: a part stopped by its time limit continues where it stopped on the next call, and
             each finished run's record lands in ``benchmarks/results/gpu_compare_methods_runs/``: commit
             it with the table, and a later session (a fresh machine) counts those runs as done.

Each part writes ``benchmarks/results/gpu_<part>.json`` ({"part", "rows", "meta": device, torch / triton /
CUDA versions, commit, ...}; ``--cpu-smoke`` writes ``cpu_smoke_<part>.json`` under ``--out_dir``), and the
command prints one table of every check last. Row status: ``ok``; ``fail`` (a check failed: exit code 1);
``miss`` (a performance goal not met: reported, not an error); ``missing`` (a value the run did not
record); ``n/a`` (not applicable here, e.g. CUDA on the CPU).

``--cpu-smoke`` runs every part at toy sizes on the CPU in about two minutes, so the suite never breaks for
the first time on a GPU (tests/test_gpu_suite_smoke.py runs it in ``make test``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ["build", "tests", "ops", "dc", "train", "generate", "compare"]
GPU_TESTS = ["tests/test_gpu_hotpath.py", "tests/test_triton_multi_lora.py", "tests/test_triton_compile.py",
             "tests/test_cuda_sources.py", "tests/test_ops_sync_free.py", "tests/test_ops_compile.py",
             "tests/test_ops_multi_lora.py"]
# what --cpu-smoke runs of the tests part: the GPU-only file (its tests skip without CUDA, so this checks that
# it imports and collects) and the CUDA-source check
SMOKE_TESTS = ["tests/test_gpu_hotpath.py", "tests/test_cuda_sources.py"]
MEMORY_GOALS_GB = {"naive": 12.0, "dsc": 24.0}
DC_GOAL_PASSES = 500.0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _env(smoke: bool, **extra) -> dict:
    env = dict(os.environ, PYTHONSAFEPATH="1", **extra)
    if smoke:
        env.pop("FASTCP_BACKEND", None)
    return env


def _run(cmd: list[str], *, timeout: float, env=None, cwd=None) -> tuple[int, str, float]:
    """(return code, tail of stdout+stderr, seconds); 124 on timeout."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or ROOT)
        return p.returncode, (p.stdout + p.stderr)[-4000:], time.time() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out[-4000:] + f"\n[timed out after {timeout:.0f} s]", time.time() - t0


def _py(*args: str) -> list[str]:
    return [sys.executable, "-P", *args]


def row(check: str, value, goal: str = "", status: str = "ok", **extra) -> dict:
    return {"check": check, "value": value, "goal": goal, "status": status, **extra}


def meta() -> dict:
    import platform

    import torch

    sys.path.insert(0, str(HERE))
    from common import device_name, git_commit

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = {"device": device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
         "python": platform.python_version(), "commit": git_commit()}
    try:
        import triton

        m["triton"] = triton.__version__
    except Exception:
        m["triton"] = None
    if torch.cuda.is_available():
        m["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return m


# ----------------------------------------------------------------------------------------------- parts
def part_build(smoke: bool, tmp: Path, limit: float) -> list[dict]:
    rows = []
    if _cuda() and not smoke:
        rc, out, sec = _run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e",
                             str(ROOT)], timeout=limit * 0.8, env=_env(smoke, FASTCP_BUILD_CUDA="1"))
        rows.append(row("build fastcp._C with CUDA", f"rc={rc}, {sec:.0f} s", "builds", "ok" if rc == 0 else "fail",
                        log=out[-1500:] if rc else ""))
    else:
        rows.append(row("build fastcp._C with CUDA", "no GPU", "builds", "n/a"))
    probe = ("import json, torch; from fastcp.ops.dispatch import ORDER, get_backend; "
             "print(json.dumps({n: get_backend(n).unavailable_reason() for n in ORDER}))")
    rc, out, _ = _run(_py("-c", probe), timeout=300, env=_env(smoke))
    try:
        reasons = json.loads(out.strip().splitlines()[-1])
    except Exception:
        return rows + [row("load backends", "probe failed", "loads", "fail", log=out[-1500:])]
    for name, why in reasons.items():
        need = name in ("reference", "cpp") or (name in ("cuda", "triton") and _cuda())
        status = "ok" if why is None else ("fail" if need else "n/a")
        rows.append(row(f"backend {name} available", "yes" if why is None else why[:80], "available" if need else "",
                        status))
    nvcc = shutil.which("nvcc")
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        if nvcc is None:
            rows.append(row(f"nvcc -c {cu.name}", "nvcc not installed", "compiles", "n/a"))
            continue
        rc, out, _ = _run([nvcc, "-c", "-arch=sm_90", "-std=c++17", str(cu), "-o", str(tmp / (cu.stem + ".o"))],
                          timeout=300)
        rows.append(row(f"nvcc -c {cu.name}", f"rc={rc}", "compiles", "ok" if rc == 0 else "fail",
                        log=out[-1500:] if rc else ""))
    return rows


def _junit_counts(path: Path) -> dict[str, dict[str, int]]:
    """{test file: {"passed", "failed", "skipped"}} from a pytest junit XML."""
    per: dict[str, dict[str, int]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        f = (case.get("file") or case.get("classname", "").replace(".", "/") + ".py").split("::")[0]
        f = "tests/" + Path(f).name
        c = per.setdefault(f, {"passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
        elif case.find("skipped") is not None:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return per


def part_tests(smoke: bool, tmp: Path, limit: float) -> list[dict]:
    files = SMOKE_TESTS if smoke else GPU_TESTS
    xml = tmp / "junit.xml"
    rc, out, sec = _run(_py("-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files),
                        timeout=limit * 0.9, env=_env(smoke))
    if not xml.exists():
        return [row("GPU-only tests", f"pytest rc={rc}, no report", "run", "fail", log=out[-1500:])]
    rows = []
    for f, c in sorted(_junit_counts(xml).items()):
        ran = c["passed"] + c["failed"]
        status = "fail" if c["failed"] else ("ok" if ran else ("n/a" if not _cuda() else "fail"))
        rows.append(row(f"pytest {f}", f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped",
                        "all pass", status))
    if rc not in (0, 5) and not any(r["status"] == "fail" for r in rows):
        rows.append(row("pytest exit code", rc, "0", "fail", log=out[-1500:]))
    rows.append(row("tests wall time", f"{sec:.0f} s", f"< {limit:.0f} s", "ok" if rc != 124 else "fail"))
    return rows


def _bench(script: str, args: list[str], smoke: bool, tmp: Path, limit: float, stem: str):
    rc, out, sec = _run(_py(str(HERE / script), *args, "--out_dir", str(tmp), "--out", stem), timeout=limit * 0.9,
                        env=_env(smoke))
    path = tmp / f"{stem}.json"
    rows = json.loads(path.read_text())["rows"] if rc == 0 and path.exists() else None
    return rc, out, sec, rows


def part_ops(smoke: bool, tmp: Path, limit: float) -> list[dict]:
    args = ["--quick", "--reps", "1", "--shapes", "attn-64"] if smoke else ["--reps", "20"]
    rc, out, sec, data = _bench("bench_multi_lora.py", args, smoke, tmp, limit, "ops_rows")
    if data is None:
        return [row("bench_multi_lora.py", f"rc={rc}", "runs", "fail", log=out[-1500:])]
    rows = [row("bench_multi_lora.py", f"{len(data)} rows in {sec:.0f} s", "runs", "ok")]
    main = "triton" if _cuda() else "cpp"
    for g in (r for r in data if r["op"] == "goal" and r["provider"] == main):
        lim = g["limit"]
        status = "ok" if lim is None or g["ratio"] <= lim else "miss"
        rows.append(row(f"{g['goal']} [{g['shape']} {g['mode']} {g['timing']}]", g["ratio"],
                        f"<= {lim}" if lim else "(baseline)", status))
    # the default GPU order: whichever of triton / cuda is faster on the routed case, eager, per shape
    routed = {(r["shape"], r["mode"], r["provider"]): r["p50_ms"] for r in data
              if r["op"] == "multi_lora_linear" and r["case"] == "routed" and r.get("timing") == "eager"}
    wins = {"triton": 0, "cuda": 0}
    for (shape, mode, prov), ms in routed.items():
        other = routed.get((shape, mode, "cuda" if prov == "triton" else "triton"))
        if prov in wins and other is not None and ms < other:
            wins[prov] += 1
    if _cuda():
        order = "triton first" if wins["triton"] >= wins["cuda"] else "cuda first (change fastcp/ops/dispatch.py ORDER)"
        rows.append(row("default GPU backend order (routed wins)", f"triton {wins['triton']} / cuda {wins['cuda']}",
                        "measured", "ok", recommendation=order))
    else:
        rows.append(row("default GPU backend order", "no GPU", "measured", "n/a"))
    return rows


def part_dc(smoke: bool, tmp: Path, limit: float) -> list[dict]:
    if smoke:
        args = ["--images", "1", "--concepts", "2", "--timesteps", "2", "--reps", "1", "--channels_last"]
    else:
        args = ["--sd15", "--images", "4", "--concepts", "8", "--timesteps", "4", "--batch_size", "64", "--reps", "3",
                "--channels_last", "--compile"]
    rc, out, sec, data = _bench("bench_dc.py", args, smoke, tmp, limit, "dc_rows")
    if data is None:
        return [row("bench_dc.py", f"rc={rc}", "runs", "fail", log=out[-1500:])]
    rows = [row("bench_dc.py", f"{len(data)} rows in {sec:.0f} s ({data[0]['model']})", "runs", "ok"),
            row("shared prefix: share of a pass's FLOPs", data[0].get("prefix_flop_frac"),
                "used only where it saves work", "ok", used=data[0].get("prefix_shared"))]
    by = {r["provider"]: r for r in data}
    best = max((r for r in data if r["provider"].startswith("batched") and r["provider"] != "batched_plain"),
               key=lambda r: r["passes_per_s"])
    goal_ok = best["passes_per_s"] >= DC_GOAL_PASSES
    rows.append(row(f"DC passes/s ({best['provider']}, batch {best['batch_size']})", best["passes_per_s"],
                    f">= {DC_GOAL_PASSES:.0f} (SD 1.5, 512 px)", ("ok" if goal_ok else "miss") if _cuda() else "n/a"))
    for base in ("loop", "batched_plain"):
        if base in by:
            rows.append(row(f"DC engine / {base} speed-up", round(best["passes_per_s"] / by[base]["passes_per_s"], 2),
                            "> 1", "ok" if best["passes_per_s"] > by[base]["passes_per_s"] or smoke else "miss"))
    return rows


def part_train(smoke: bool, tmp: Path, limit: float) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from sd15 import make_pipeline, write_concepts

    pipe = make_pipeline(tmp / "pipeline", tiny=smoke)
    size = 32 if smoke else 512
    concepts = write_concepts(tmp / "data", num=2, images=2 if smoke else 4, size=size)
    steps = 1 if smoke else 20
    rows = []
    gpu = _cuda()
    per_run = limit * 0.9 / 2
    for method in ("naive", "dsc"):
        out_dir = tmp / f"run_{method}"
        cmd = _py("-m", "fastcp.train", "--pretrained_model_name_or_path", str(pipe), "--concepts", str(concepts),
                  "--method", method, "--mixed_precision", "bf16", "--gradient_checkpointing",
                  "--train_batch_size", "1", "--max_train_steps", str(steps),
                  "--num_eval_images", "1", "--eval_inference_steps", "2", "--dc_timesteps", "2",
                  "--dc_eval_images", "1", "--output_dir", str(out_dir), "--overwrite_output_dir")
        rc, out, sec = _run(cmd, timeout=per_run, env=_env(smoke))
        if rc != 0:
            last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or [""]
            rows.append(row(f"train {method}", f"rc={rc}: {last[0][:90]}", "runs", "fail", log=out[-2000:]))
            continue
        rows.append(row(f"train {method}", f"{sec:.0f} s", "runs", "ok"))
        try:
            tasks = json.loads((out_dir / "train_log.json").read_text())["tasks"]
        except Exception as exc:
            rows.append(row(f"train {method} train_log.json", f"unreadable: {exc}", "present", "fail"))
            continue
        devices = {t.get("device") for t in tasks}
        if devices == {None}:
            rows.append(row(f"train {method} device", "missing", "cuda" if gpu else "any", "missing"))
        else:
            ok = all(str(d).startswith("cuda") for d in devices) if gpu else True
            rows.append(row(f"train {method} device", ",".join(sorted(map(str, devices))), "cuda" if gpu else "any",
                            "ok" if ok else "fail"))
        peaks = [t.get("peak_memory_gb") for t in tasks]
        goal = MEMORY_GOALS_GB[method]
        if any(p is None for p in peaks):
            rows.append(row(f"train {method} peak memory (GB)", "missing", f"< {goal:.0f}", "missing"))
        else:
            peak = max(peaks)
            rows.append(row(f"train {method} peak memory (GB)", round(peak, 2), f"< {goal:.0f}",
                            ("ok" if peak < goal else "fail") if gpu else "n/a"))
        sps = [t.get("seconds_per_step") for t in tasks]
        rows.append(row(f"train {method} seconds/step", "missing" if any(s is None for s in sps) else
                        round(sum(sps) / len(sps), 3), "(measured)", "missing" if any(s is None for s in sps) else "ok"))
    return rows


def part_generate(smoke: bool, tmp: Path, limit: float) -> list[dict]:
    if smoke:
        args = ["--concepts", "2", "--images", "1", "--steps", "2", "--reps", "1"]
    else:
        args = ["--sd15", "--concepts", "8", "--images", "2", "--steps", "10", "--reps", "3"]
    rc, out, sec, data = _bench("bench_generate.py", args, smoke, tmp, limit, "generate_rows")
    if data is None:
        return [row("bench_generate.py", f"rc={rc}", "runs", "fail", log=out[-1500:])]
    by = {r["provider"]: r for r in data}
    first = data[0]
    speedup = round(by["diffusers_set_adapters"]["p50_ms"] / by["fastcp_routed"]["p50_ms"], 2)
    batching = round(by["fastcp_per_concept"]["p50_ms"] / by["fastcp_routed"]["p50_ms"], 2)
    shape = f"K={first['K']} x M={first['M']}, {first['model']}"
    # same model, same noise: bf16 kernels differ in rounding (fastcp fused, peft separate), fp32 must agree
    tol = 5e-2 if first["dtype"] == "bfloat16" else 1e-4
    close = first["max_abs_diff"] <= tol
    return [row("bench_generate.py", f"{len(data)} rows in {sec:.0f} s ({shape})", "runs", "ok"),
            row("diffusers set_adapters per concept / fastcp routed batch", speedup, "> 1",
                "ok" if speedup > 1 or smoke else "miss"),
            row("fastcp per concept / fastcp routed batch", batching, "> 1", "ok" if batching > 1 or smoke else "miss"),
            row("max |fastcp - diffusers| (concept 0 pixels)", first["max_abs_diff"], f"<= {tol:g}",
                "ok" if close else ("miss" if first["dtype"] == "bfloat16" else "fail"))]


def part_compare(smoke: bool, tmp: Path, limit: float, runs_dir: Path, out_dir: Path) -> list[dict]:
    if smoke:
        methods, seeds = "naive", ["0"]
        train = ["--max_concepts", "2", "--max_train_steps", "1", "--num_eval_images", "1",
                 "--eval_inference_steps", "2", "--dc_timesteps", "2", "--dc_eval_images", "1"]
        runs_dir = tmp / "compare_runs"
    else:
        methods, seeds = "all", ["0", "1", "2"]
        train = ["--max_concepts", "6", "--max_train_steps", "400"]
    # the tiny model leaves an H100 mostly idle (launch-bound): 4 runs share it, each with 1/4 of the
    # CPU cores; its seconds per task are then those of a shared GPU (an upper bound)
    jobs = "1" if smoke else "4"
    stem = out_dir / ("cpu_smoke_compare_methods" if smoke else "gpu_compare_methods")
    cmd = _py("-m", "fastcp.experiments", "compare", "--seeds", *seeds, "--runs_dir", str(runs_dir),
              "--results", str(stem), "--jobs", jobs)
    if methods != "all":
        cmd += ["--methods", methods]
    if smoke:  # the smoke's runs leave no records in the results folder; a GPU run's records are kept
        cmd += ["--records", str(tmp / "compare_records")]  # (gpu_compare_methods_runs/, commit them)
    rc, out, sec = _run(cmd + ["--", *train], timeout=limit * 0.9, env=_env(smoke))
    if rc == 124:
        done = len(list(Path(runs_dir).glob("*/seed_*/results.json")))
        return [row("experiments compare", f"{done} runs finished in {sec:.0f} s", "complete", "miss",
                    note="stopped by the part's time limit; rerun --part compare to continue (runs resume)")]
    if rc != 0 or not stem.with_suffix(".json").exists():
        return [row("experiments compare", f"rc={rc}", "complete", "fail", log=out[-2000:])]
    res = json.loads(stem.with_suffix(".json").read_text())
    rows = [row("experiments compare", f"{len(res['methods'])} methods in {sec:.0f} s", "complete", "ok",
                results=str(stem.with_suffix(".md")))]
    for m, r in res["methods"].items():
        met = r.get("metrics", {})
        first = next(iter(met), None)
        val = f"{first} {met[first]['average']['mean']:.3f}" if first else "no metrics"
        rows.append(row(f"compare {m}", val, "(reported)", "ok", seconds_per_task=r.get("seconds_per_task")))
    return rows


# ----------------------------------------------------------------------------------------------- driver
def print_table(all_rows: list[tuple[str, dict]]) -> None:
    w = max([len(r["check"]) for _, r in all_rows] + [10])
    print(f"\n{'part':<8} {'check':<{w}} {'value':<40} {'goal':<28} status")
    print("-" * (w + 90))
    for part, r in all_rows:
        print(f"{part:<8} {r['check']:<{w}} {str(r['value'])[:40]:<40} {str(r['goal'])[:28]:<28} {r['status']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=PARTS + ["all"], default="all")
    ap.add_argument("--cpu-smoke", action="store_true", help="every part at toy sizes on the CPU (no GPU needed)")
    ap.add_argument("--out_dir", type=Path, default=HERE / "results")
    ap.add_argument("--limit", type=float, default=None,
                    help="seconds per part (default 570: each part fits a 10-minute call; 240 with --cpu-smoke)")
    ap.add_argument("--runs_dir", type=Path, default=HERE / "results" / "gpu_compare_runs",
                    help="compare: where the (resumable) runs live")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not _cuda():
        print("gpu_suite: no CUDA device; run with --cpu-smoke for the CPU version", file=sys.stderr)
        return 2
    limit = args.limit or (240.0 if smoke else 570.0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    parts = PARTS if args.part == "all" else [args.part]
    m = meta()
    m["cpu_smoke"] = smoke
    table: list[tuple[str, dict]] = []
    failed = False
    for part in parts:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix=f"gpu_suite_{part}_") as td:
            tmp = Path(td)
            try:
                if part == "compare":
                    rows = part_compare(smoke, tmp, limit, args.runs_dir, args.out_dir)
                else:
                    rows = {"build": part_build, "tests": part_tests, "ops": part_ops, "dc": part_dc,
                            "train": part_train, "generate": part_generate}[part](smoke, tmp, limit)
            except Exception as exc:  # a part that crashes is a failed check, and the others still run
                import traceback

                rows = [row(f"{part} part", f"{type(exc).__name__}: {exc}"[:200], "runs", "fail",
                            log=traceback.format_exc()[-2000:])]
        sec = time.time() - t0
        stem = ("cpu_smoke_" if smoke else "gpu_") + part
        (args.out_dir / f"{stem}.json").write_text(json.dumps(
            {"part": part, "seconds": round(sec, 1), "meta": m, "rows": rows}, indent=1, default=str) + "\n")
        print(f"[gpu_suite] part {part}: {len(rows)} checks in {sec:.0f} s -> {args.out_dir / (stem + '.json')}",
              flush=True)
        for r in rows:
            if r["status"] == "fail" and r.get("log"):
                print(f"--- {part}: {r['check']} ---\n{r['log']}", flush=True)
        failed |= any(r["status"] == "fail" for r in rows)
        table += [(part, r) for r in rows]
    print_table(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
