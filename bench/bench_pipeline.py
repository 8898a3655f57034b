"""Wall time of a fully cached pipeline re-run (every stage already complete).

    python -m bench.bench_pipeline [--reps 3] [--quick] [--keep DIR]

Runs ``blt run --preset tiny`` with overrides that shrink it (a 300 KB default corpus, a few training steps,
a small evaluation) once to build every stage, then re-runs the same command ``--reps`` times and reports the
median wall time of a re-run, as a user sees it (a fresh process: Python and package imports, the ephemeral
Prefect API start, five Prefect tasks answered from their cache or the stage manifests). Each re-run's
stage statuses are checked: nothing may be built again. Also timed: the same re-run inside one process
(``flows.pipeline.run_pipeline``, Prefect already started), which isolates the DAG's own overhead.
Results go to ``bench/results/pipeline.md`` (and ``pipeline.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine_line

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "pipeline.md"

OVERRIDES = [
    "data.default_corpus_bytes=300000", "data.shard_bytes=200000", "data.val_fraction=0.1",
    "entropy.train.max_steps=6", "entropy.train.val_every_n_steps=3", "entropy.train.ckpt_every_n_steps=3",
    "entropy.train.batch_size=4", "entropy.train.seq_len=256",
    "patch.calibration_docs=16",
    "blt.train.max_steps=6", "blt.train.val_every_n_steps=3", "blt.train.ckpt_every_n_steps=3",
    "blt.train.batch_size=4", "blt.train.seq_len=32", "blt.train.max_bytes_per_row=256",
    "eval.max_val_bytes=20000", "eval.samples=1", "eval.generate_bytes=16",
]
QUICK = ["data.default_corpus_bytes=120000", "eval.baseline=false", "eval.max_val_bytes=5000"]


def _env(prefect_home: Path) -> dict:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_HOME": str(prefect_home),
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    env.pop("PREFECT_API_URL", None)
    return env


def run_cli(workdir: Path, overrides: list[str], env: dict) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "blt_pipeline.cli", "run", "--preset", "tiny", "--workdir", str(workdir)]
    for o in overrides:
        cmd += ["--set", o]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    secs = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"blt run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return secs, out.stdout


def _statuses(stdout: str) -> dict[str, str]:
    """Stage -> status from ``format_summary``'s lines (``  ingest  cached (Prefect) ...``)."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("ingest", "train_entropy", "patch", "train_blt", "evaluate") and len(parts) > 1:
            found.setdefault(parts[0], " ".join(parts[1:3]))  # the stage table comes first
    return found


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller corpus, no baseline, 2 re-runs")
    ap.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    overrides = OVERRIDES + (QUICK if args.quick else [])
    reps = 2 if args.quick else args.reps
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    base.mkdir(parents=True, exist_ok=True)
    work, phome = base / "runs", base / "prefect-home"
    env = _env(phome)
    try:
        build_s, out = run_cli(work, overrides, env)
        print(f"first run (builds every stage): {build_s:.1f} s", flush=True)
        reruns, statuses = [], []
        for i in range(reps):
            secs, out = run_cli(work, overrides, env)
            st = _statuses(out)
            statuses.append(st)
            reruns.append(secs)
            print(f"re-run {i + 1}: {secs:.1f} s {st}", flush=True)
            rebuilt = [s for s, v in st.items() if v.startswith("ran")]
            if rebuilt:
                raise RuntimeError(f"a cached re-run rebuilt {rebuilt}:\n{out[-3000:]}")
        inproc = _in_process(work, overrides, phome, reps)
        res = {
            "machine": machine_line(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": os.getloadavg(), "quick": args.quick, "overrides": overrides,
            "first_run_s": round(build_s, 2), "rerun_s": [round(x, 2) for x in reruns],
            "inprocess_rerun_s": [round(x, 3) for x in inproc], "statuses": statuses[-1] if statuses else {},
            "medians": {"cached_rerun_cli_s": round(statistics.median(reruns), 2),
                        "cached_rerun_in_process_s": round(statistics.median(inproc), 3) if inproc else None},
        }
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(res, indent=1))
    write_results(args.out, res)
    return res


def _in_process(work: Path, overrides: list[str], phome: Path, reps: int) -> list[float]:
    """Re-runs inside one process (imports and the ephemeral Prefect API paid once, untimed)."""
    code = (
        "import json, sys, time\n"
        "from blt_pipeline.config import load_config\n"
        "from flows.pipeline import run_pipeline\n"
        f"cfg = load_config('tiny', {overrides!r}, workdir={str(work)!r})\n"
        "run_pipeline(cfg)\n"
        "ts = []\n"
        f"for _ in range({reps}):\n"
        "    t = time.perf_counter(); r = run_pipeline(cfg); ts.append(time.perf_counter() - t)\n"
        "    assert all(s['run']['status'] != 'ran' for s in r['stages'].values()), r['stages']\n"
        "print('TIMES', json.dumps(ts))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(phome), capture_output=True, text=True,
                         timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("TIMES "):
            return json.loads(line[6:])
    print(f"in-process timing failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}", file=sys.stderr)
    return []


def write_results(path: Path, r: dict) -> None:
    from blt_pipeline.stage import atomic_write_json, atomic_write_text

    m = r["medians"]
    lines = [
        "# Cached pipeline re-run (`python -m bench.bench_pipeline`)", "",
        f"- machine: {r['machine']}",
        f"- date: {r['date']}",
        f"- load average at the end: {', '.join(f'{x:.1f}' for x in r['load'])} (shared machine)",
        "- workload: `blt run --preset tiny` with overrides " + " ".join(f"`{o}`" for o in r["overrides"]),
        "- a re-run must build nothing: every stage answered by Prefect's cache (keyed by the stage key) or "
        "the stage manifest",
        "",
        "| measurement | median s | runs (s) |",
        "|---|---:|---|",
        f"| first run (builds every stage) | {r['first_run_s']:.1f} | - |",
        f"| cached re-run, `blt run` in a fresh process | {m['cached_rerun_cli_s']:.2f} "
        f"| {', '.join(f'{x:.2f}' for x in r['rerun_s'])} |",
    ]
    if m.get("cached_rerun_in_process_s") is not None:
        lines.append(f"| cached re-run, `run_pipeline(cfg)` in a warm process | {m['cached_rerun_in_process_s']:.3f} "
                     f"| {', '.join(f'{x:.3f}' for x in r['inprocess_rerun_s'])} |")
    lines += ["", "Stage statuses of the last re-run: "
              + ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()), ""]
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(path.with_suffix(".json"), r)


if __name__ == "__main__":
    main()
