"""``python -m fastcp.experiments compare``: every CP method and variant × seeds on the embedded sequence.

    python -m fastcp.experiments compare                         # every entry, seeds 0 1 2, train defaults
    python -m fastcp.experiments compare --methods naive,ortho,ortho:exact --seeds 0 1 2 -- --max_concepts 3
    python -m fastcp.experiments compare --available             # only tabulate the runs already finished
    python -m fastcp.experiments compare --jobs 2                # two runs at once, half the cores each

An entry is a method or a named variant of one (``ENTRIES``: ``ortho:exact`` is ``--method ortho
--ortho_variant exact``). Everything after ``--`` is passed to ``python -m fastcp.train`` unchanged
(same flags, same defaults). Each (entry, seed) run is its own process (so its peak memory is its
own) and lands in ``<runs_dir>/<entry with ':' as '-'>/seed_<s>/`` (local: ``outputs/``).
A finished run leaves a **record** (``make_record``: its results.json, per-task seconds, peak memory
and threads, a few KB) in ``<results stem>_runs/<entry>/seed_<s>.json``, committed beside the
table; the table is built from the records alone, so runs made in one sitting count in every later
one, on any checkout. A run with a record (made with the same ``fastcp.train`` arguments) or a
``results.json`` is skipped, one with checkpoints but neither (interrupted) goes on from its newest
checkpoint (``--rerun`` redoes them), and ``--available`` writes the table from what is finished,
saying which seeds each entry has. ``prior_summary.json`` in the records directory holds rows of an
earlier table whose runs left no records (``PRIOR_FILE``): their seeds count as finished and their
statistics are pooled exactly with the records' (``_pooled``).
The seed changes the rendering of the embedded concepts' images, the LoRA/token initialisation
and every training draw (the concept order is the sequence's own).

The headline metric is the judge's fidelity (a classifier trained on the synthetic world,
independent of every training objective): ``learned`` (each concept right after its own task),
``average`` (last row) and ``forgetting``. ``dc_acc`` is shown too, marked as trained-on for the
methods whose loss contains the DC cross-entropy (``DC_TRAINED``): it measures their objective.

Writes ``<results>.json``::

    {"methods": {entry: {"method", "flags", "runs", "seeds",
                         "metrics": {metric: {"average"|"forgetting"|"learned": {"mean", "std"}}},
                         "seconds_per_task": {"mean", "std"},   # training only (no evaluation)
                         "peak_memory_gb": {"mean", "std"} | null,   # per run: CUDA peak, else peak RSS
                         "time_vs_naive": float | null,
                         "vs_naive": {"forgets_less": bool, "learned_ratio": float} | null,
                         "pooled_from_prior": [seed, ...]}},   # only where a prior row was pooled in
     "train_args": [...], "commit": str, "torch": str, "device": str, "threads": int,
     "records": str, "prior_commit": str | null, "missing": {entry: [seed, ...]}}

and ``<results>.md``: one Markdown table (mean ± std over seeds; the mean alone, std null in the JSON,
for an entry with one finished seed) for the README.
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

#: entry name -> (method, extra ``fastcp.train`` flags): every method at its defaults (the papers'
#: forms) and the named variants beside them
ENTRIES: dict[str, tuple[str, list[str]]] = {
    "naive": ("naive", []),
    "merge": ("merge", []),
    "ortho": ("ortho", []),  # --ortho_variant paper
    "ortho:exact": ("ortho", ["--ortho_variant", "exact"]),
    "magmax": ("magmax", []),  # --magmax_variant incremental (mag_max_light)
    "magmax:cumulative": ("magmax", ["--magmax_variant", "cumulative"]),
    "clora": ("clora", []),  # K/V only, no class word, random token
    "clora:class_word": ("clora", ["--clora_class_word"]),
    "ewc_dc": ("ewc_dc", []),  # --fisher_estimate online
    "ewc_dc:post_task": ("ewc_dc", ["--fisher_estimate", "post_task"]),
    "dsc": ("dsc", []),
    "dsc_ewc": ("dsc_ewc", []),
    "fl2t": ("fl2t", []),  # sets of 2
    "joint": ("joint", []),  # reference: sees every concept's data
    "separate": ("separate", []),  # reference: one adapter per concept, routed by the prompt's token
}
ALL_METHODS = list(ENTRIES)
#: methods whose training loss contains CE(DC logits, c_n): dc_acc measures their own objective
DC_TRAINED = {"ewc_dc", "dsc", "dsc_ewc"}
METRIC_ORDER = ["fidelity", "dc_acc", "holdout_loss"]
#: in a records directory: rows of an earlier table whose per-run files were not kept (entry ->
#: {"runs", "seeds", "tasks_per_run", "peak_runs", "metrics", "seconds_per_task", "peak_memory_gb"});
#: ``aggregate`` pools them exactly with the records, and their seeds count as finished
PRIOR_FILE = "prior_summary.json"
#: the lines that enclose the table in the README (``--readme``)
README_BEGIN, README_END = "<!-- cp_methods table: begin", "<!-- cp_methods table: end -->"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def run_env(jobs: int = 1) -> dict[str, str]:
    """The environment of a ``fastcp.train`` child process: never the repo root on sys.path (it holds
    kernels/), and with ``jobs`` > 1 runs at once an equal share of the cores each (on the tiny model
    one thread per run does more work per second than two runs taking turns with all of them)."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def entry_dir(runs_dir: Path, entry: str, seed: int) -> Path:
    return Path(runs_dir) / entry.replace(":", "-") / f"seed_{seed}"


def records_dir(results_stem: Path) -> Path:
    """Where the per-run records of a table live: ``<stem>_runs/`` beside ``<stem>.json`` (committed
    for the CPU table, so runs made in one sitting count in every later one; run directories under
    ``outputs/`` are local and do not survive a fresh checkout)."""
    results_stem = Path(results_stem)
    return results_stem.parent / f"{results_stem.name}_runs"


def record_path(records: Path, entry: str, seed: int) -> Path:
    return Path(records) / entry.replace(":", "-") / f"seed_{seed}.json"


def make_record(entry: str, run_dir: Path, train_args: list[str], omp_num_threads: str | None) -> dict:
    """The part of a finished run that the table needs, as one small JSON file: its results.json
    (metrics with their task x concept matrices, concepts, seed, config), the per-task seconds and
    peak memory of its train_log.json, and what it ran on."""
    import torch

    results = json.loads((run_dir / "results.json").read_text())
    log = json.loads((run_dir / "train_log.json").read_text())
    keep = ("task", "concept", "train_seconds", "eval_seconds", "seconds_per_step", "device", "num_processes",
            "threads", "peak_memory_gb", "peak_rss_gb")
    return {"entry": entry, "seed": results["seed"], "train_args": list(train_args), "results": results,
            "tasks": [{k: t.get(k) for k in keep} for t in log["tasks"]],
            "recorded_at_commit": _commit(), "torch": torch.__version__,
            "device": f"cpu ({platform.processor() or platform.machine()})" if log["tasks"][0].get("device", "cpu") == "cpu"
            else log["tasks"][0]["device"],
            # torch's intra-op threads as the run logged them (older logs: the OMP_NUM_THREADS it was given)
            "threads": log["tasks"][0].get("threads") or (int(omp_num_threads) if omp_num_threads else None)}


def read_record(path: Path, train_args: list[str]) -> dict | None:
    """A run's record if it exists and was made with these ``fastcp.train`` arguments, else None."""
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("train_args") == list(train_args) else None


def read_prior(records: Path, train_args: list[str]) -> dict:
    """{entry: row} of ``PRIOR_FILE`` in ``records`` (runs known only by an earlier table's summary
    statistics, pooled exactly into the new table), or {} when absent or made with other arguments."""
    path = Path(records) / PRIOR_FILE
    if not path.exists():
        return {}
    prior = json.loads(path.read_text())
    return prior["methods"] if prior.get("train_args") == list(train_args) else {}


def _run_peak_gb(log: dict) -> float | None:
    """A run's peak memory: the largest CUDA peak of its tasks, else its process's peak RSS."""
    cuda = [t.get("peak_memory_gb") or 0.0 for t in log["tasks"]]
    if max(cuda, default=0.0) > 0:
        return max(cuda)
    rss = [t["peak_rss_gb"] for t in log["tasks"] if t.get("peak_rss_gb")]
    return max(rss) if rss else None


def _pooled(values, prior: dict | None = None, prior_n: int = 0) -> dict:
    """mean and sample std (ddof=1) of ``values`` together with ``prior_n`` earlier values known only
    by their summary ``prior`` ({"mean", "std"}): the exact pooled statistics, as if every value were
    here (sum of squared deviations: each group's own plus n_g * (mean_g - mean)^2)."""
    v = np.asarray(values, dtype=np.float64)
    groups = [(len(v), float(v.mean()) if len(v) else 0.0, float(((v - v.mean()) ** 2).sum()) if len(v) else 0.0)]
    if prior is not None and prior_n > 0:
        groups.append((prior_n, prior["mean"], (prior_n - 1) * (prior["std"] or 0.0) ** 2))
    n = sum(g[0] for g in groups)
    mean = sum(g[0] * g[1] for g in groups) / n
    ss = sum(g[2] + g[0] * (g[1] - mean) ** 2 for g in groups)
    # one run has no spread: std is null (the table prints the mean alone), never a made-up 0
    return {"mean": mean, "std": float(np.sqrt(ss / (n - 1))) if n > 1 else None}


def aggregate(runs: dict[str, list[dict]], prior: dict | None = None) -> dict:
    """runs: {entry: [{"results": results.json, "task_seconds": [float], "peak_gb": float | None}]},
    prior: {entry: an earlier table's row (``PRIOR_FILE``)} whose runs are pooled in by their summary
    statistics -> the "methods" dict."""
    prior = prior or {}
    out = {}
    for m in dict.fromkeys([*runs, *prior]):
        rs, pr = runs.get(m, []), prior.get(m)
        if not rs and pr is None:
            continue
        pn = pr["runs"] if pr else 0
        names = list(rs[0]["results"]["metrics"]) if rs else list(pr["metrics"])
        metrics = {}
        for name in names:
            old = pr["metrics"].get(name) if pr else None
            per_run = {"average": [r["results"]["metrics"][name]["average"] for r in rs],
                       "forgetting": [r["results"]["metrics"][name]["forgetting"] for r in rs],
                       "learned": [learned(r["results"]["metrics"][name]["matrix"]) for r in rs]}
            metrics[name] = {k: _pooled(vals, old and old[k], pn if old else 0) for k, vals in per_run.items()}
        secs = [s for r in rs for s in r["task_seconds"]]
        peaks = [r["peak_gb"] for r in rs if r.get("peak_gb") is not None]
        method, flags = ENTRIES.get(m, (m, []))
        seeds = sorted([*(pr["seeds"] if pr else []), *(r["results"]["seed"] for r in rs)])
        prior_peak = pr and pr.get("peak_memory_gb")
        out[m] = {"method": method, "flags": flags, "runs": len(rs) + pn, "seeds": seeds,
                  "metrics": metrics,
                  "seconds_per_task": _pooled(secs, pr and pr["seconds_per_task"], pn * pr["tasks_per_run"] if pr else 0),
                  "peak_memory_gb": (_pooled(peaks, prior_peak, pr.get("peak_runs", pn) if prior_peak else 0)
                                     if peaks or prior_peak else None)}
        if pr:
            out[m]["pooled_from_prior"] = pr["seeds"]
    base = out.get("naive")
    for m, v in out.items():
        v["time_vs_naive"] = (v["seconds_per_task"]["mean"] / base["seconds_per_task"]["mean"]) if base else None
        if base and "fidelity" in v["metrics"]:
            f, fb = v["metrics"]["fidelity"], base["metrics"]["fidelity"]
            v["vs_naive"] = {"forgets_less": f["forgetting"]["mean"] < fb["forgetting"]["mean"],
                             "learned_ratio": f["learned"]["mean"] / fb["learned"]["mean"] if fb["learned"]["mean"] else None}
        else:
            v["vs_naive"] = None
    return out


def prior_commit(records: Path) -> str | None:
    path = Path(records) / PRIOR_FILE
    return json.loads(path.read_text()).get("commit") if path.exists() else None


def _prior_note(methods: dict, commit: str | None) -> str:
    pooled = [f"`{m}` seeds {' '.join(map(str, v['pooled_from_prior']))}" for m, v in methods.items()
              if v.get("pooled_from_prior")]
    if not pooled:
        return ""
    return (f"\nPooled from `{PRIOR_FILE}` (the table at commit {commit}, whose per-run files were not kept; "
            f"mean and std pooled exactly): " + "; ".join(pooled) + ".\n")


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f}" if s["std"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


def markdown_table(methods: dict) -> str:
    """Rows = entries. Judge fidelity first (learned / average / forgetting: independent of every
    training objective), then dc_acc (†: trained on by the DC methods) and the held-out loss, the
    training cost per task and the peak memory of a run."""
    head = ["method", "fidelity learned ↑", "fidelity avg ↑", "fidelity forget ↓", "learned × naive",
            "dc_acc avg ↑", "dc_acc forget ↓", "holdout_loss avg ↓", "train s/task", "× naive", "peak GB", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in methods.items():
        row = [f"`{name}`"]
        f = v["metrics"].get("fidelity")
        row += [_pm(f["learned"]), _pm(f["average"]), _pm(f["forgetting"])] if f else ["–"] * 3
        ratio = (v.get("vs_naive") or {}).get("learned_ratio")
        row.append(f"{ratio:.2f}" if ratio is not None else "–")
        d = v["metrics"].get("dc_acc")
        mark = " †" if v.get("method", name) in DC_TRAINED else ""
        row += [_pm(d["average"]) + mark, _pm(d["forgetting"]) + mark] if d else ["–", "–"]
        h = v["metrics"].get("holdout_loss")
        row.append(_pm(h["average"]) if h else "–")
        sp = v["seconds_per_task"]
        row += [f"{sp['mean']:.1f}", f"{v['time_vs_naive']:.2f}" if v["time_vs_naive"] else "–"]
        pk = v.get("peak_memory_gb")
        row += [f"{pk['mean']:.2f}" if pk else "–", " ".join(map(str, v["seeds"]))]
        lines.append("| " + " | ".join(row) + " |")
    notes = ("\n† dc_acc is what the DC methods' cross-entropy term trains (their objective, not an independent "
             "measure); the judge fidelity is the headline.\n")
    return "\n".join(lines) + "\n" + notes


def _train_command(method: str, flags: list[str], seed: int, out: Path, train_args: list[str],
                   resume: bool = False) -> list[str]:
    """One run as its own process. ``resume``: continue an interrupted run from its newest
    checkpoint (the run's fingerprint is checked: changed code or flags refuse, use --rerun)."""
    where = ["--resume_from_checkpoint", "latest"] if resume else ["--overwrite_output_dir"]
    return [sys.executable, "-m", "fastcp.train", "--method", method, *flags, "--seed", str(seed),
            "--output_dir", str(out), *where, *train_args]


def compare(argv: list[str]) -> int:
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    else:
        train_args = []
    p = argparse.ArgumentParser(prog="python -m fastcp.experiments compare",
                                description="every CP method and variant x seeds on the embedded sequence; args after "
                                            "-- go to fastcp.train")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated entries (default: all): {', '.join(ALL_METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs_dir", type=Path, default=Path("outputs/cp_compare"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/cp_methods"),
                   help="output stem: writes <stem>.json and <stem>.md")
    p.add_argument("--records", type=Path, default=None,
                   help="per-run records (default <results stem>_runs/, committed with the table): a run with a "
                        "record is finished; each finished run directory's record is (re)written there")
    p.add_argument("--rerun", action="store_true", help="redo runs whose results.json or record exists")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with its share of the cores (default 1; train s/task is then per share)")
    p.add_argument("--readme", type=Path, default=None,
                   help="also write the table (with what is not finished) into this file, between its "
                        f"'{README_BEGIN}' and '{README_END}' lines")
    p.add_argument("--available", action="store_true",
                   help="train nothing: tabulate the finished runs of the entries and seeds asked for")
    args = p.parse_args(argv)
    from fastcp import checkpoint
    from fastcp.files import atomic_write_json, atomic_write_text

    if args.jobs < 1:
        print(f"fastcp.experiments: error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    entries = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in entries if m not in ENTRIES]
    if unknown:
        print(f"fastcp.experiments: error: unknown entry(ies) {unknown}; choose from {', '.join(ENTRIES)}",
              file=sys.stderr)
        return 2
    for bad in ("--method", "--seed", "--output_dir"):
        if bad in train_args:
            print(f"fastcp.experiments: error: {bad} is set by the comparison; remove it after --", file=sys.stderr)
            return 2
    runs: dict[str, list[dict]] = {m: [] for m in entries}
    env = run_env(args.jobs)
    records = args.records or records_dir(args.results)

    def usable_prior() -> dict:
        # a record of one of its seeds (a --rerun) supersedes an entry's prior row as a whole: a
        # summary cannot be split back into its runs
        return {m: row for m, row in read_prior(records, train_args).items()
                if m in entries and not any(read_record(record_path(records, m, s), train_args) for s in row["seeds"])}

    prior = usable_prior()

    def finished(m: str, s: int) -> bool:
        return ((entry_dir(args.runs_dir, m, s) / "results.json").exists()
                or read_record(record_path(records, m, s), train_args) is not None
                or s in prior.get(m, {}).get("seeds", []))

    pending = [(m, s) for m in entries for s in args.seeds if not args.available and (args.rerun or not finished(m, s))]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float, bool]] = {}
    failed = None
    while (pending and failed is None) or running:
        while pending and failed is None and len(running) < args.jobs:
            m, s = pending.pop(0)
            method, flags = ENTRIES[m]
            out = entry_dir(args.runs_dir, m, s)
            # an interrupted run (checkpoints, no results.json) goes on from its last checkpoint
            resume = not args.rerun and checkpoint.latest(out) is not None
            running[(m, s)] = (subprocess.Popen(_train_command(method, flags, s, out, train_args, resume), env=env),
                               time.time(), resume)
        time.sleep(0.2)
        for key, (proc, t0, resume) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[key]
            if rc != 0:
                hint = " (resuming its checkpoint; --rerun starts it over)" if resume else ""
                print(f"fastcp.experiments: error: {key[0]} seed {key[1]} failed (exit {rc}){hint}", file=sys.stderr)
                failed = failed or rc  # the runs already started finish; their results are kept
            else:
                print(f"[compare] {key[0]} seed {key[1]}: {time.time() - t0:.0f}s", flush=True)
                # its record is written at once: it is what later sittings count
                atomic_write_json(record_path(records, *key), make_record(
                    key[0], entry_dir(args.runs_dir, *key), train_args, env.get("OMP_NUM_THREADS")))
    # finished run directories (of this sitting or an earlier one on this machine) refresh their
    # record only when it is missing or made with other arguments: a record's omp_num_threads is
    # that of the sitting that ran it
    for m in entries:
        for s in args.seeds:
            out, rec = entry_dir(args.runs_dir, m, s), record_path(records, m, s)
            if (out / "results.json").exists() and read_record(rec, train_args) is None:
                atomic_write_json(rec, make_record(m, out, train_args, None))
    if failed is not None:
        return failed
    prior = usable_prior()
    for m in entries:
        pooled = set(prior.get(m, {}).get("seeds", []))
        for s in args.seeds:
            rec = read_record(record_path(records, m, s), train_args)
            if rec is None or s in pooled:
                continue  # --available: not finished yet (or already counted through the prior summary)
            runs[m].append({"results": rec["results"], "task_seconds": [t["train_seconds"] for t in rec["tasks"]],
                            "peak_gb": _run_peak_gb(rec)})
    import torch

    summary = {"methods": aggregate(runs, prior), "train_args": train_args, "seeds": args.seeds, "commit": _commit(),
               "torch": torch.__version__, "device": f"cpu ({platform.processor() or platform.machine()})",
               "threads": torch.get_num_threads(), "omp_num_threads": env.get("OMP_NUM_THREADS"), "jobs": args.jobs,
               "records": str(records), "prior_commit": prior_commit(records) if prior else None}
    done = {m: summary["methods"].get(m, {}).get("seeds", []) for m in entries}
    summary["missing"] = {m: [s for s in args.seeds if s not in done[m]] for m in entries
                          if any(s not in done[m] for s in args.seeds)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results.with_suffix(".json"), summary)
    table = markdown_table(summary["methods"])
    cmd = "python -m fastcp.experiments compare " + " ".join(argv + (["--"] + train_args if train_args else []))
    missing = "".join(f"\n- `{m}`: seeds {' '.join(map(str, ss))} not run yet" for m, ss in summary["missing"].items())
    md = (f"Continual personalization on the embedded tiny sequence, mean ± std over the seeds listed per row "
          f"(`{cmd.strip()}`, commit {summary['commit']}, {summary['device']}, "
          f"{summary['omp_num_threads'] or summary['threads']} threads per run). "
          f"learned = each concept's judge fidelity right after its own task; avg = last row of the task × concept "
          f"matrix; forget = mean drop from each concept's best; learned × naive = learned / naive's learned; "
          f"train s/task excludes evaluation; peak GB = the run's peak memory (CUDA peak, else the process's "
          f"resident set). Each run's record is in `{records}/`.\n\n" + table
          + (f"\nNot finished:{missing}\n" if missing else "") + _prior_note(summary["methods"], summary["prior_commit"]))
    atomic_write_text(args.results.with_suffix(".md"), md)
    if args.readme is not None:
        block = table + (f"\nNot finished:{missing}\n" if missing else "") + _prior_note(summary["methods"], summary["prior_commit"])
        if not replace_block(args.readme, block):
            print(f"fastcp.experiments: error: {args.readme} has no '{README_BEGIN} ...' / '{README_END}' lines; "
                  f"the table is in {args.results.with_suffix('.md')}", file=sys.stderr)
            return 2
    print(table)
    return 0


def replace_block(path: Path, block: str) -> bool:
    """Put ``block`` between the README_BEGIN and README_END lines of ``path`` (kept); False when
    the file lacks them (the file is then left as it was)."""
    lines = Path(path).read_text().split("\n")
    begin = next((i for i, line in enumerate(lines) if line.startswith(README_BEGIN)), None)
    end = next((i for i, line in enumerate(lines) if line.startswith(README_END)), None)
    if begin is None or end is None or end < begin:
        return False
    from fastcp.files import atomic_write_text

    atomic_write_text(Path(path), "\n".join(lines[: begin + 1] + block.strip("\n").split("\n") + lines[end:]))
    return True


def profile(argv: list[str]) -> int:
    """Where a training step's time goes: per method, the median seconds of each loss term's
    forward+backward at task ``--task`` (so the DC terms see task+2 candidates), and the Fisher.

        python -m fastcp.experiments profile [--methods naive,ewc_dc,dsc] [--task 2] [--steps 5] [--eval]

    ``--eval``: also the evaluation of row ``--task`` (every concept learned so far): held-out
    loss, dc_acc and the judge's samples, concept by concept and in one batched pass.
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
    p.add_argument("--eval", action="store_true", help="also time the evaluation of row --task")
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
        if args.eval:
            med.update(_profile_row(trainer, args.task))
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


def _profile_row(trainer, n: int) -> dict[str, float]:
    """Seconds of each part of row n's evaluation (concepts 0..n), one by one and batched."""
    import torch

    ev, js = trainer.evaluator, list(range(n + 1))
    out = {}
    trainer.bb.unet.eval()
    with torch.no_grad():
        for key, fn in ((f"eval: holdout_loss, {n + 1} concepts one by one", lambda: [ev.holdout_loss(j) for j in js]),
                        (f"eval: holdout_loss, {n + 1} concepts batched", lambda: ev.holdout_losses(js)),
                        (f"eval: dc_acc, {n + 1} concepts", lambda: [ev.dc_accuracy(j, n) for j in js]),
                        (f"eval: judge samples, {n + 1} concepts one by one", lambda: [ev.generate(j) for j in js]),
                        (f"eval: judge samples, {n + 1} concepts batched", lambda: ev.generate_many(js))):
            if "dc_acc" in key and "dc_acc" not in ev.metrics:
                continue
            t0 = time.perf_counter()
            fn()
            out[key] = time.perf_counter() - t0
    trainer.bb.unet.train()
    return out


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
