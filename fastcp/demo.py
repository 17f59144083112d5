"""``python -m fastcp.demo`` (``make demo``): the problem and the fix, side by side.

Teaches the embedded tiny model its concepts one after another twice: with ``naive`` (one LoRA
trained on through every task: it forgets) and with ``--method`` (default ``merge``), each a full
``python -m fastcp.train`` run with the demo's settings (``DEMO_TRAIN_FLAGS``). Then writes

    <output_dir>/naive/, <output_dir>/<method>/   the two runs (results.json, model/, heatmaps, grids)
    <output_dir>/forgetting.png                    fidelity of each concept after every task, one
                                                   panel per method, one line per concept
    <output_dir>/samples.png                       the two runs' last sample grids side by side
    <output_dir>/summary.json                      the printed summary, as data

and prints learned / average / forgetting of the judge's fidelity per method.

Why these settings (measured on the 2-core development machine, DESIGN.md's CI kind, 2026-12-07):
    - 3 concepts × 150 steps: every concept is learned (fidelity 1.0 right after its task) and
      naive loses the first ones; a 4th concept (checker_square, the same pattern as the first)
      breaks every cheap method, merge included: the 6-concept comparison in the README shows
      that, the demo shows the fix where it holds.
    - ``merge`` forgot least of the naive-cost methods (merge, ortho, magmax) on these settings.
    - 8 judge images per concept at 10 sampling steps, no dc_acc (``--dc_eval_images 0``): the
      judge's fidelity is the demo's metric; a row's concepts are sampled in one batched pass.
    - On a CPU with >= 2 cores the two runs go in parallel processes with half the cores each:
      one thread per run does ~1.5x more work per second on this tiny model than two threads
      on one run after the other. On a GPU they run one after the other.
Flags after ``--`` go to both ``fastcp.train`` runs (after the demo's, so they override them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

#: the method shown next to naive (see the module docstring for the measurement)
DEMO_METHOD = "merge"
#: fastcp.train flags of both demo runs
DEMO_TRAIN_FLAGS = ["--max_concepts", "3", "--max_train_steps", "150", "--num_eval_images", "8",
                    "--eval_inference_steps", "10", "--dc_eval_images", "0"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcp.demo",
                                description="naive against one regularised method on the embedded sequence; "
                                            "flags after -- go to both fastcp.train runs")
    p.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    p.add_argument("--method", default=DEMO_METHOD, help=f"the method shown next to naive (default {DEMO_METHOD})")
    p.add_argument("--parallel", choices=["auto", "yes", "no"], default="auto",
                   help="run the two trainings at once (auto: on a CPU with >= 2 cores)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="start over where runs already finished")
    return p


def _run_both(methods: list[str], out: Path, train_flags: list[str], parallel: bool) -> dict[str, int]:
    """Each method's ``fastcp.train`` run as its own process, lines prefixed with its name; in
    parallel, each process gets an equal share of the cores. Returns {method: exit status}."""
    from fastcp.experiments import run_env

    env = dict(run_env(len(methods) if parallel else 1), PYTHONUNBUFFERED="1")  # lines as they come
    width = max(map(len, methods))

    def start(m):
        cmd = [sys.executable, "-m", "fastcp.train", "--method", m, "--output_dir", str(out / m), *train_flags]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def relay(m, proc):
        for line in proc.stdout:
            print(f"[{m:>{width}}] {line}", end="", flush=True)

    codes = {}
    batches = [methods] if parallel else [[m] for m in methods]
    for batch in batches:
        procs = {m: start(m) for m in batch}
        readers = [threading.Thread(target=relay, args=(m, p)) for m, p in procs.items()]
        for r in readers:
            r.start()
        for m, p in procs.items():
            codes[m] = p.wait()
        for r in readers:
            r.join()
        if any(codes.values()):
            break  # the other run's finished tasks stay on disk
    return codes


def summarize_runs(results: dict[str, dict]) -> dict[str, dict]:
    """{method: {"learned", "average", "forgetting", "matrix", "concepts"}} of the judge's fidelity."""
    from fastcp.eval.metrics import learned

    out = {}
    for m, r in results.items():
        f = r["metrics"]["fidelity"]
        out[m] = {"learned": learned(f["matrix"]), "average": f["average"], "forgetting": f["forgetting"],
                  "matrix": f["matrix"], "concepts": r["concepts"]}
    return out


def format_summary(summary: dict[str, dict]) -> str:
    """The side-by-side table: one line per method, then each concept's fidelity after the last task."""
    names = next(iter(summary.values()))["concepts"]
    head = f"{'fidelity':<10}{'learned':>9}{'average':>9}{'forgetting':>12}   " + "".join(f"{n[:14]:>15}" for n in names)
    lines = [head, "-" * len(head)]
    for m, s in summary.items():
        last = "".join(f"{v:>15.3f}" for v in s["matrix"][-1])
        lines.append(f"{m:<10}{s['learned']:>9.3f}{s['average']:>9.3f}{s['forgetting']:>12.3f}   {last}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    from fastcp.methods import METHODS

    if args.method not in METHODS or args.method == "naive":
        print(f"fastcp.demo: error: --method must be a method other than naive, got {args.method!r}", file=sys.stderr)
        return 2
    for bad in ("--method", "--output_dir"):
        if bad in extra:
            print(f"fastcp.demo: error: {bad} is set by the demo; remove it after --", file=sys.stderr)
            return 2
    import torch

    from fastcp.experiments import run_env

    methods = ["naive", args.method]
    out = args.output_dir
    parallel = args.parallel == "yes" or (args.parallel == "auto" and not torch.cuda.is_available()
                                          and (os.cpu_count() or 1) >= 2)
    flags = DEMO_TRAIN_FLAGS + (["--overwrite_output_dir"] if args.overwrite_output_dir else []) + extra
    t0 = time.time()
    print(f"fastcp demo: naive and {args.method} on the embedded sequence "
          f"({'in parallel, ' + run_env(len(methods))['OMP_NUM_THREADS'] + ' thread(s) each' if parallel else 'one after the other'}); "
          f"runs in {out}/", flush=True)
    codes = _run_both(methods, out, flags, parallel)
    failed = [m for m, c in codes.items() if c]
    if failed or len(codes) < len(methods):
        m = failed[0] if failed else methods[len(codes)]
        print(f"fastcp.demo: error: the {m} run failed (exit {codes.get(m)}); its finished tasks are in {out / m}",
              file=sys.stderr)
        return codes.get(m) or 1
    from fastcp.eval import report
    from fastcp.files import atomic_write_json

    results = {m: json.loads((out / m / "results.json").read_text()) for m in methods}
    summary = summarize_runs(results)
    report.save_forgetting_figure(summary, out / "forgetting.png")
    last = len(summary["naive"]["concepts"])
    report.save_side_by_side([out / m / f"samples_task_{last:02d}.png" for m in methods],
                             [f"{m} (after task {last})" for m in methods], out / "samples.png")
    atomic_write_json(out / "summary.json", {"methods": summary, "train_flags": flags,
                                             "seconds": round(time.time() - t0, 1)})
    print()
    print(format_summary(summary))
    print(f"\nfinished in {time.time() - t0:.0f}s: {out / 'forgetting.png'}, {out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
