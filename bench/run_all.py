"""Run every benchmark and index the results: ``python -m bench.run_all [--quick] [--only NAME ...]``.

Each bench module present (``bench.bench_model``, ``bench_patch``, ``bench_ingest``, ``bench_generate``,
``bench_pipeline``) runs in its own process (``python -m bench.<name> [quick args]``) and writes its own
``bench/results/<name without bench_>.md`` (plus, for some, a ``.json`` with a ``medians`` dict). Then
``bench/results/README.md`` is written: machine, date, load, the command and duration of each bench, its
``medians`` (from the ``.json``) or else the first table of its ``.md``, and a link to the full file.

``--quick`` passes each bench a small workload (``QUICK_ARGS``) so the whole suite runs in a few minutes;
quick results are marked as such in the index.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cpu_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHES = ["bench_model", "bench_patch", "bench_ingest", "bench_generate", "bench_pipeline"]
QUICK_ARGS: dict[str, list[str]] = {
    "bench_model": ["--steps", "3", "--warmup", "1"],
    "bench_patch": ["--kb", "32", "--chunks", "512,2048", "--rounds", "1", "--no-official"],
    "bench_ingest": ["--mb", "64"],
    "bench_generate": ["--quick"],
    "bench_pipeline": ["--quick"],
}
DESCRIPTIONS = {
    "bench_model": "training-step throughput, our BLT vs transformers' BltForCausalLM",
    "bench_patch": "entropy computation / patching throughput",
    "bench_ingest": "ingest MB/s and peak RSS",
    "bench_generate": "generation bytes/s: incremental vs full recompute vs transformers",
    "bench_pipeline": "wall time of a fully cached pipeline re-run",
}


def machine() -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gb"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def results_file(name: str) -> Path:
    return RESULTS / f"{name.removeprefix('bench_')}.md"


def present(name: str) -> bool:
    return importlib.util.find_spec(f"bench.{name}") is not None


def first_table(md: str) -> str:
    """The first markdown table of a results file (lines starting with '|')."""
    out, started = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            out.append(line)
            started = True
        elif started:
            break
    return "\n".join(out)


def run_one(name: str, quick: bool, extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", f"bench.{name}", *(QUICK_ARGS.get(name, []) if quick else []), *extra]
    print(f"== {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {timeout} s"
    secs = time.perf_counter() - t
    print(f"   rc={rc} in {secs:.0f} s", flush=True)
    return {"name": name, "cmd": " ".join(["python", *cmd[1:]]), "rc": rc, "seconds": round(secs, 1),
            "tail": tail if rc else ""}


def collect(name: str) -> dict:
    md_path = results_file(name)
    js_path = md_path.with_suffix(".json")
    out: dict = {"md": md_path.name if md_path.exists() else None}
    if js_path.exists():
        try:
            data = json.loads(js_path.read_text())
            out["medians"] = data.get("medians")
            out["date"] = data.get("date")
        except ValueError:
            pass
    if md_path.exists():
        text = md_path.read_text()
        out["table"] = first_table(text)
        for line in text.splitlines():
            if line.startswith("- date:"):
                out.setdefault("date", line.split(":", 1)[1].strip())
                break
    return out


def write_index(runs: list[dict], quick: bool, started: str, path: Path = RESULTS / "README.md") -> Path:
    from blt_pipeline.stage import atomic_write_text

    m = machine()
    lines = [
        "# Benchmark results", "",
        "Written by `python -m bench.run_all" + (" --quick" if quick else "") + "`; each bench writes its own file "
        "here, this index collects their medians. Re-run a single bench with the command shown.", "",
        f"- machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb', '?')} GB RAM"
        + (f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"),
        f"- software: Python {m.get('python')}, torch {m.get('torch', '?')}, {m.get('platform')}",
        f"- date: {started} (run_all start)",
        f"- load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(a shared machine inflates absolute times; ratios measured inside one bench are more stable)",
        f"- mode: {'QUICK (small workloads, indicative only)' if quick else 'full'}", "",
        "| bench | what | status | seconds | results |", "|---|---|---|---:|---|",
    ]
    for r in runs:
        c = r.get("collected", {})
        status = ("ok" if c.get("md") else "no results file") if r["rc"] == 0 else \
            ("not present" if r["rc"] is None else f"failed (rc {r['rc']})")
        link = f"[{c['md']}]({c['md']})" if c.get("md") else "-"
        lines.append(f"| `{r['name']}` | {DESCRIPTIONS.get(r['name'], '')} | {status} | {r.get('seconds', '-')} | {link} |")
    lines.append("")
    for r in runs:
        c = r.get("collected", {})
        lines += [f"## {r['name']}", "", f"`{r['cmd']}`" if r.get("cmd") else "(module not present)", ""]
        if r["rc"]:
            lines += ["```", r.get("tail", "").strip(), "```", ""]
        if c.get("date"):
            lines += [f"results dated {c['date']}", ""]
        if c.get("medians"):
            lines += ["| median | value |", "|---|---:|"]
            lines += [f"| {k} | {v} |" for k, v in c["medians"].items()]
            lines.append("")
        elif c.get("table"):
            lines += [c["table"], ""]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small workloads (minutes in total)")
    ap.add_argument("--only", nargs="*", default=None, help="bench names to run (default: all present)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per bench")
    ap.add_argument("--index-only", action="store_true", help="rewrite README.md from existing results")
    args = ap.parse_args(argv)
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = [n if n.startswith("bench_") else f"bench_{n}" for n in (args.only or BENCHES)]
    runs = []
    for name in names:
        if not present(name):
            runs.append({"name": name, "rc": None, "cmd": None})
            continue
        r = {"name": name, "rc": 0, "cmd": f"python -m bench.{name}"} if args.index_only else \
            run_one(name, args.quick, [], args.timeout)
        r["collected"] = collect(name)
        runs.append(r)
    path = write_index(runs, args.quick, started)
    print(f"wrote {path}")
    return 0 if all(r["rc"] in (0, None) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
