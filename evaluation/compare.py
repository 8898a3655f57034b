"""Compare training runs: validation BPB against bytes seen, one PNG plus a markdown table.

Reads only local files: every training stage directory writes ``metrics.jsonl`` (one JSON object per
line; fields ``step``, ``train/bytes_seen``, ``val/bpb``, ``train/loss``, ...). A row that carries
``val/bpb`` but no ``train/bytes_seen`` takes the bytes seen of the latest earlier row that has it.

``blt compare RUN_DIR [RUN_DIR ...] --out compare.png`` accepts stage directories or any directory
containing them (searched recursively for ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
BYTES_KEYS = ("train/bytes_seen", "bytes_seen", "trainer/bytes_seen")
VAL_KEYS = ("val/bpb", "val_bpb")
FLOPS_KEYS = ("train/flops", "flops")


@dataclass
class RunCurve:
    """One run's validation curve and headline numbers."""

    label: str
    path: Path
    steps: list[int] = field(default_factory=list)
    bytes_seen: list[float] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)
    flops: list[float | None] = field(default_factory=list)
    last_step: int = 0
    last_bytes: float = 0.0
    last_train_loss: float | None = None
    kind: str | None = None

    @property
    def final_bpb(self) -> float | None:
        return self.val_bpb[-1] if self.val_bpb else None

    @property
    def best_bpb(self) -> float | None:
        return min(self.val_bpb) if self.val_bpb else None


def _first(row: dict, keys: tuple[str, ...]):
    for k in keys:
        v = row.get(k)
        if v is not None:
            return v
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a killed writer) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_curve(metrics_path: str | Path, label: str | None = None) -> RunCurve:
    """The validation curve of one metrics.jsonl (points ordered by step; a resumed run's repeats dedup)."""
    metrics_path = Path(metrics_path)
    run_dir = metrics_path.parent
    curve = RunCurve(label=label or run_label(run_dir), path=run_dir)
    curve.kind = _manifest(run_dir).get("stage")
    bytes_seen = 0.0
    flops = None
    points: dict[int, tuple[float, float, float | None]] = {}
    for row in read_metrics(metrics_path):
        step = row.get("step")
        b = _first(row, BYTES_KEYS)
        if _finite(b):
            bytes_seen = float(b)
        fl = _first(row, FLOPS_KEYS)
        if _finite(fl):
            flops = float(fl)
        if isinstance(step, (int, float)):
            curve.last_step = max(curve.last_step, int(step))
        curve.last_bytes = max(curve.last_bytes, bytes_seen)
        if _finite(row.get("train/loss")):
            curve.last_train_loss = float(row["train/loss"])
        v = _first(row, VAL_KEYS)
        if _finite(v):
            s = int(step) if isinstance(step, (int, float)) else len(points)
            points[s] = (bytes_seen, float(v), flops)  # a resumed run re-logging a step replaces it
    for s in sorted(points):
        b, v, fl = points[s]
        curve.steps.append(s)
        curve.bytes_seen.append(b)
        curve.val_bpb.append(v)
        curve.flops.append(fl)
    return curve


def _manifest(run_dir: Path) -> dict:
    try:
        m = json.loads((run_dir / "manifest.json").read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def run_label(run_dir: Path) -> str:
    """``<stage>/<key prefix>`` for a stage directory (``train_blt/3f2a...``), else the folder's name."""
    m = _manifest(run_dir)
    if m.get("stage") and m.get("key"):
        return f"{m['stage']}/{str(m['key'])[:8]}"
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.parent.name else run_dir.name


def find_metrics(run_dirs: list[str | Path]) -> list[Path]:
    """metrics.jsonl files of the given stage dirs, or found below the given dirs (sorted, no repeats)."""
    found: list[Path] = []
    for d in run_dirs:
        d = Path(d)
        if d.is_file() and d.name == METRICS_FILE:
            cands = [d]
        elif (d / METRICS_FILE).is_file():
            cands = [d / METRICS_FILE]
        elif d.is_dir():
            cands = sorted(p for p in d.rglob(METRICS_FILE) if "wandb" not in p.parts)
        else:
            raise FileNotFoundError(f"{d}: no such run directory")
        if not cands:
            raise FileNotFoundError(f"{d}: no {METRICS_FILE} found (is it a training stage directory?)")
        for c in cands:
            if c.resolve() not in {f.resolve() for f in found}:
                found.append(c)
    return found


def load_runs(run_dirs: list[str | Path]) -> list[RunCurve]:
    curves = [load_curve(p) for p in find_metrics(run_dirs)]
    seen: dict[str, int] = {}
    for c in curves:  # make labels unique
        n = seen.get(c.label, 0)
        seen[c.label] = n + 1
        if n:
            c.label = f"{c.label} ({n + 1})"
    return curves


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def markdown_table(curves: list[RunCurve]) -> str:
    lines = [
        "| run | steps | bytes seen | val evals | final val BPB | best val BPB | last train loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curves:
        lines.append(
            f"| {c.label} | {c.last_step} | {_human(c.last_bytes)} | {len(c.val_bpb)} | {_fmt(c.final_bpb)} "
            f"| {_fmt(c.best_bpb)} | {_fmt(c.last_train_loss)} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(curves: list[RunCurve], out: str | Path, x: str = "bytes",
                title: str = "validation BPB", xs: dict[str, list[float]] | None = None) -> Path:
    """One PNG with a line per run: val BPB against bytes seen (``x="bytes"``) or given x values.

    ``xs`` maps a run label to its own x values (e.g. training FLOPs) and overrides ``x``.
    """
    from evaluation.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for c in curves:
        if not c.val_bpb:
            continue
        xv = (xs or {}).get(c.label) or (c.bytes_seen if x == "bytes" else c.steps)
        ax.plot(xv, c.val_bpb, marker="o", markersize=3, label=c.label)
    xlabel = {"bytes": "bytes seen", "steps": "step"}.get(x, x)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val bits per byte")
    ax.set_title(title)
    if any(c.val_bpb for c in curves):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out)


def compare(run_dirs: list[str | Path], out: str | Path = "compare.png") -> tuple[Path, str]:
    """Plot every run found under ``run_dirs`` to ``out`` and write ``<out stem>.md``; returns both."""
    curves = load_runs(run_dirs)
    png = plot_curves(curves, out)
    table = markdown_table(curves)
    from blt_pipeline.stage import atomic_write_text

    atomic_write_text(Path(out).with_suffix(".md"), "# Run comparison\n\n" + table + f"\n![]({Path(out).name})\n")
    return png, table


def cli(args) -> int:
    png, table = compare(args.run_dirs, args.out)
    print(table, end="")
    print(f"wrote {png} and {Path(png).with_suffix('.md')}")
    return 0
