"""``python -m fastcp.experiments compare``: every CP method × seeds on the embedded sequence.

    python -m fastcp.experiments compare                         # all methods, seeds 0 1 2, train defaults
    python -m fastcp.experiments compare --methods naive,dsc --seeds 0 1 2 -- --max_concepts 3 --max_train_steps 100

Everything after ``--`` is passed to ``python -m fastcp.train`` unchanged (same flags, same
defaults). Each (method, seed) run lands in ``<runs_dir>/<method>/seed_<s>/`` and is skipped when
its ``results.json`` already exists (so an interrupted comparison resumes; ``--rerun`` redoes
them). The seed changes the rendering of the embedded concepts' images, the LoRA/token
initialisation and every training draw (the concept order is the sequence's own).

Writes ``<results>.json``::

    {"methods": {name: {"runs": int, "seeds": [int],
                        "metrics": {metric: {"average": {"mean", "std"}, "forgetting": {"mean", "std"}}},
                        "seconds_per_task": {"mean", "std"},   # training only (no evaluation)
                        "time_vs_naive": float | null}},
     "train_args": [...], "commit": str, "torch": str, "device": str, "threads": int}

and ``<results>.md``: one Markdown table (mean ± std over seeds) for the README.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fastcp.eval.metrics import learned

ALL_METHODS = ["naive", "merge", "ortho", "magmax", "clora", "ewc_dc", "dsc", "dsc_ewc", "fl2t", "joint", "separate"]
METRIC_ORDER = ["fidelity", "dc_acc", "holdout_loss"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def _mean_std(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """runs: {method: [{"results": results.json, "task_seconds": [float]}]} -> the "methods" dict."""
    out = {}
    for m, rs in runs.items():
        if not rs:
            continue
        metrics = {}
        for name in rs[0]["results"]["metrics"]:
            metrics[name] = {
                "average": _mean_std([r["results"]["metrics"][name]["average"] for r in rs]),
                "forgetting": _mean_std([r["results"]["metrics"][name]["forgetting"] for r in rs]),
                "learned": _mean_std([learned(r["results"]["metrics"][name]["matrix"]) for r in rs]),
            }
        secs = [s for r in rs for s in r["task_seconds"]]
        out[m] = {"runs": len(rs), "seeds": [r["results"]["seed"] for r in rs], "metrics": metrics,
                  "seconds_per_task": _mean_std(secs)}
    base = out.get("naive", {}).get("seconds_per_task", {}).get("mean")
    for m in out:
        out[m]["time_vs_naive"] = (out[m]["seconds_per_task"]["mean"] / base) if base else None
    return out


def markdown_table(methods: dict) -> str:
    """Rows = methods; columns = average/forgetting per metric (mean ± std), the fidelity just after
    each concept's own task ("learned": a method that stops learning forgets nothing), train s/task."""
    metrics = [m for m in METRIC_ORDER if any(m in v["metrics"] for v in methods.values())]
    head = ["method"]
    for m in metrics:
        arrow = "↓" if m == "holdout_loss" else "↑"
        head += [f"{m} avg {arrow}"] + (["fidelity learned ↑"] if m == "fidelity" else []) + [f"{m} forget ↓"]
    head += ["train s/task", "× naive"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in methods.items():
        row = [f"`{name}`"]
        for m in metrics:
            s = v["metrics"].get(m)
            keys = ["average", "learned", "forgetting"] if m == "fidelity" else ["average", "forgetting"]
            if s is None:
                row += ["–"] * len(keys)
                continue
            row += [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in keys]
        sp = v["seconds_per_task"]
        row += [f"{sp['mean']:.1f}", f"{v['time_vs_naive']:.2f}" if v["time_vs_naive"] else "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def compare(argv: list[str]) -> int:
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    else:
        train_args = []
    p = argparse.ArgumentParser(prog="python -m fastcp.experiments compare",
                                description="every CP method x seeds on the embedded sequence; args after -- go to fastcp.train")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs_dir", type=Path, default=Path("outputs/cp_compare"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/cp_methods"),
                   help="output stem: writes <stem>.json and <stem>.md")
    p.add_argument("--rerun", action="store_true", help="redo runs whose results.json exists")
    args = p.parse_args(argv)
    from fastcp import train
    from fastcp.files import atomic_write_json
    from fastcp.methods import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"fastcp.experiments: error: unknown method(s) {unknown}; choose from {sorted(METHODS)}", file=sys.stderr)
        return 2
    for bad in ("--method", "--seed", "--output_dir"):
        if bad in train_args:
            print(f"fastcp.experiments: error: {bad} is set by the comparison; remove it after --", file=sys.stderr)
            return 2
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for m in methods:
        for s in args.seeds:
            out = args.runs_dir / m / f"seed_{s}"
            if args.rerun or not (out / "results.json").exists():
                t0 = time.time()
                rc = train.main(["--method", m, "--seed", str(s), "--output_dir", str(out), "--overwrite_output_dir",
                                 *train_args])
                if rc != 0:
                    print(f"fastcp.experiments: error: {m} seed {s} failed (exit {rc})", file=sys.stderr)
                    return rc
                print(f"[compare] {m} seed {s}: {time.time() - t0:.0f}s", flush=True)
            results = json.loads((out / "results.json").read_text())
            log = json.loads((out / "train_log.json").read_text())
            runs[m].append({"results": results, "task_seconds": [t["train_seconds"] for t in log["tasks"]]})
    import torch

    summary = {"methods": aggregate(runs), "train_args": train_args, "seeds": args.seeds, "commit": _commit(),
               "torch": torch.__version__, "device": f"cpu ({platform.processor() or platform.machine()})",
               "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results.with_suffix(".json"), summary)
    table = markdown_table(summary["methods"])
    cmd = "python -m fastcp.experiments compare " + " ".join(argv + (["--"] + train_args if train_args else []))
    md = (f"Continual personalization on the embedded tiny sequence, mean ± std over seeds {args.seeds} "
          f"(`{cmd.strip()}`, commit {summary['commit']}). avg = last row of the task × concept matrix; "
          f"forget = mean drop from each concept's best; train s/task excludes evaluation.\n\n" + table)
    tmp = args.results.with_suffix(".md.tmp")
    tmp.write_text(md)
    os.replace(tmp, args.results.with_suffix(".md"))
    print(table)
    return 0


def profile(argv: list[str]) -> int:
    """Where a training step's time goes: per method, the median seconds of each loss term's
    forward+backward at task ``--task`` (so the DC terms see task+2 candidates), and the Fisher.

        python -m fastcp.experiments profile [--methods naive,ewc_dc,dsc] [--task 2] [--steps 5]
    """
    import statistics

    import torch

    from fastcp.continual import ContinualTrainer
    from fastcp.data.concepts import embedded_sequence
    from fastcp.models import load_backbone
    from fastcp import train

    p = argparse.ArgumentParser(prog="python -m fastcp.experiments profile")
    p.add_argument("--methods", default="naive,ewc_dc,dsc,dsc_ewc")
    p.add_argument("--task", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args, rest = p.parse_known_args(argv)
    report = {}
    for name in args.methods.split(","):
        targs = train.build_parser().parse_args(["--output_dir", "unused", "--method", name, *rest])
        # the run's own setup (accelerate, LoRA injection, tokens, method), as python -m fastcp.train does it
        trainer = ContinualTrainer(targs, load_backbone("tiny"), embedded_sequence(args.task + 1, seed=0))
        trainer.setup()
        m = trainer.method
        t_end = []
        for n in range(args.task):
            m.begin_task(n)
            m.release_hooks()
            t0 = time.perf_counter()
            m.end_task(n)
            t_end.append(time.perf_counter() - t0)
        m.begin_task(args.task)
        images, classes = trainer.task_images(args.task)
        parts: dict[str, list[float]] = {}

        def timed(key, fn):
            t0 = time.perf_counter()
            out = fn()
            out.backward()
            parts.setdefault(key, []).append(time.perf_counter() - t0)

        for _ in range(args.steps + 1):  # the first step is warm-up
            batch = m.draw_step(args.task, images, targs.train_batch_size, classes)
            timed("step (loss fwd+bwd)", lambda: m.loss(batch)["loss"])
            timed("L_diff fwd+bwd", lambda: m.diffusion_loss(batch))
            if hasattr(m, "dsc_pass"):
                timed("DC pass fwd+bwd (student+teacher rows)",
                      lambda: sum(v for v in m.dsc_pass(batch).values()))
            elif hasattr(m, "dc_ce"):
                timed("DC CE fwd+bwd", lambda: m.dc_ce(batch))
            if getattr(m, "fisher", None):
                timed("EWC penalty fwd+bwd", lambda: m.ewc_penalty())
        med = {k: statistics.median(v[1:]) for k, v in parts.items()}
        med["end_task (merge + Fisher)"] = statistics.median(t_end) if t_end else 0.0
        report[name] = med
        m.release_hooks()
    base = report.get("naive", {}).get("step (loss fwd+bwd)")
    for name, med in report.items():
        ratio = f" ({med['step (loss fwd+bwd)'] / base:.2f}x naive)" if base else ""
        print(f"{name}: step {med['step (loss fwd+bwd)'] * 1e3:.1f} ms{ratio}")
        for k, v in med.items():
            if k != "step (loss fwd+bwd)":
                print(f"    {k:42s} {v * 1e3:9.1f} ms")
    if args.out is not None:
        from fastcp.files import atomic_write_json

        atomic_write_json(args.out, {"task": args.task, "steps": args.steps, "train_args": rest,
                                     "median_seconds": report, "threads": torch.get_num_threads()})
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("compare", "profile"):
        print("usage: python -m fastcp.experiments compare [--methods ...] [--seeds ...] [-- train flags]\n"
              "       python -m fastcp.experiments profile [--methods ...] [--task N] [--steps S] [train flags]",
              file=sys.stderr)
        return 2
    return compare(argv[1:]) if argv[0] == "compare" else profile(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
