"""What a pipeline run shows in the Prefect UI (and prints at the end of ``blt run``).

``headline(result)`` pulls the numbers people look at first out of the stage summaries; ``summary_markdown``
renders the per-run markdown artifact; ``metrics_table`` the table artifact; ``publish(result)`` creates
both (keyed by the run name, so the Artifacts page keeps their history).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from flows.tasks import STAGES, artifact_key

#: summary keys tried, in order, for each headline number (the first present wins)
HEADLINES: list[tuple[str, str, tuple[str, ...]]] = [
    ("entropy_val_bpb", "train_entropy", ("val_bpb", "val/bpb", "best_val_bpb", "final_val_bpb")),
    ("bytes_per_patch", "patch", ("bytes_per_patch", "mean_bytes_per_patch", "mean_patch_bytes",
                                  "avg_patch_length")),
    ("patch_threshold", "patch", ("threshold", "theta")),
    ("blt_val_bpb", "train_blt", ("val_bpb", "val/bpb", "best_val_bpb", "final_val_bpb")),
    ("eval_blt_bpb", "evaluate", ("blt_bpb", "blt_val_bpb", "bpb")),
    ("eval_baseline_bpb", "evaluate", ("baseline_bpb", "baseline_val_bpb")),
]

LABELS = {
    "entropy_val_bpb": "entropy model val BPB",
    "bytes_per_patch": "bytes / patch",
    "patch_threshold": "patch threshold θ",
    "blt_val_bpb": "BLT val BPB (training)",
    "eval_blt_bpb": "BLT BPB (evaluate)",
    "eval_baseline_bpb": "byte-level baseline BPB (evaluate)",
}


def _flat_numbers(summary: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (summary or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[name] = v
        elif isinstance(v, dict):
            out.update(_flat_numbers(v, name + "."))
    return out


def headline(result: dict) -> dict[str, float]:
    """The headline numbers of a pipeline result (only those the stages reported; nothing is invented)."""
    stages = result.get("stages", {})
    out: dict[str, float] = {}
    for name, stage, keys in HEADLINES:
        nums = _flat_numbers((stages.get(stage) or {}).get("summary") or {})
        for k in keys:
            if k in nums:
                out[name] = nums[k]
                break
    return out


def wandb_run_dirs(stage_dir: str | Path | None) -> list[str]:
    """W&B run folders (offline-run-*, run-*) under a stage directory, for ``wandb sync <dir>``."""
    if not stage_dir or not Path(stage_dir).exists():
        return []
    found = set()
    for pattern in ("wandb/offline-run-*", "wandb/run-*", "*/wandb/offline-run-*", "*/wandb/run-*"):
        found.update(str(p) for p in Path(stage_dir).glob(pattern) if p.is_dir())
    return sorted(found)


def report_path(result: dict) -> str | None:
    ev = (result.get("stages") or {}).get("evaluate") or {}
    if isinstance(ev.get("report"), str):
        return ev["report"]
    summary = ev.get("summary") or {}
    for k in ("report", "report_path", "report_md", "report_html"):
        if isinstance(summary.get(k), str):
            p = Path(summary[k])
            return str(p if p.is_absolute() or not ev.get("dir") else Path(ev["dir"]) / p)
    if ev.get("dir"):
        for name in ("report.md", "report.html"):
            if (Path(ev["dir"]) / name).exists():
                return str(Path(ev["dir"]) / name)
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def _fmt_s(v: Any) -> str:
    return f"{v:.1f} s" if isinstance(v, (int, float)) else "-"


STATUS_TEXT = {
    "cached": "cached (Prefect)",
    "reused": "cached (stage manifest)",
    "ran": "ran",
    "placeholder": "placeholder",
    "failed": "FAILED",
}


def summary_markdown(result: dict) -> str:
    stages = result.get("stages", {})
    lines = [f"# BLT pipeline `{result.get('name')}`: {result.get('state', 'Completed')}", ""]
    if result.get("error"):
        lines += [f"**Error** in `{result.get('failed_stage')}`: `{result['error']}`", "",
                  "Fix the cause (or just press **Retry**): finished stages are reused, training resumes "
                  "from its `last` checkpoint.", ""]
    lines += ["| stage | status | duration | build time | key | output |", "|---|---|---|---|---|---|"]
    for stage in STAGES:
        r = stages.get(stage)
        if r is None:
            lines.append(f"| {stage} | not run | - | - | - | - |")
            continue
        run = r.get("run", {})
        key = (r.get("key") or "-")[:16]
        lines.append(f"| {stage} | {STATUS_TEXT.get(run.get('status'), run.get('status'))} | "
                     f"{_fmt_s(run.get('seconds'))} | {_fmt_s(r.get('build_seconds'))} | `{key}` | "
                     f"`{r.get('dir') or '-'}` |")
    ev = stages.get("evaluate") or {}
    if ev.get("placeholder"):
        lines += ["", f"> evaluate: {ev.get('message')}"]
    nums = headline(result)
    lines += ["", "## Headline numbers", ""]
    if nums:
        lines += [f"- **{LABELS[k]}**: {_fmt(v)}" for k, v in nums.items()]
    else:
        lines.append("- (none reported yet)")
    lines += ["", "## Where things are", "", f"- workdir: `{result.get('workdir')}`"]
    rep = report_path(result)
    lines.append(f"- evaluation report: `{rep}`" if rep else "- evaluation report: (none)")
    wb = result.get("wandb_dirs") or []
    if wb:
        lines += ["- W&B runs (offline unless WANDB_MODE=online); upload later with `wandb sync <dir>`:"]
        lines += [f"  - `wandb sync {d}`" for d in wb]
    else:
        lines.append("- W&B runs: none found in the stage directories")
    lines += ["", f"Prefect results/cache records: `{result.get('results_dir')}`"]
    return "\n".join(lines) + "\n"


def metrics_table(result: dict) -> list[dict[str, Any]]:
    """One row per (stage, metric) with every numeric summary value, plus status and duration."""
    rows = []
    for stage in STAGES:
        r = (result.get("stages") or {}).get(stage)
        if r is None:
            continue
        run = r.get("run", {})
        base = {"stage": stage, "status": run.get("status"), "seconds": run.get("seconds"),
                "key": (r.get("key") or "")[:16]}
        nums = _flat_numbers(r.get("summary") or {})
        if not nums:
            rows.append({**base, "metric": "", "value": None})
        rows += [{**base, "metric": k, "value": v} for k, v in sorted(nums.items())]
    return rows


def publish(result: dict) -> None:
    """Create the markdown and table artifacts of a pipeline run (inside a flow run; best effort)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    name = str(result.get("name") or "blt")
    with contextlib.suppress(Exception):
        create_markdown_artifact(summary_markdown(result), key=artifact_key(name, "summary"),
                                 description=f"BLT pipeline {name}: stages, numbers, outputs")
    with contextlib.suppress(Exception):
        create_table_artifact(metrics_table(result), key=artifact_key(name, "metrics"),
                              description=f"BLT pipeline {name}: stage summaries")


def format_summary(result: dict) -> str:
    """Plain-text summary for the terminal: stages, headline numbers, where everything is."""
    stages = result.get("stages", {})
    out = [f"BLT pipeline '{result.get('name')}': {result.get('state', 'Completed')} "
           f"in {_fmt_s(result.get('seconds'))}"]
    if result.get("error"):
        out.append(f"  failed in {result.get('failed_stage')}: {result['error']}")
    out.append("")
    width = max(len(s) for s in STAGES)
    for stage in STAGES:
        r = stages.get(stage)
        if r is None:
            out.append(f"  {stage:<{width}}  not run")
            continue
        run = r.get("run", {})
        status = STATUS_TEXT.get(run.get("status"), str(run.get("status")))
        where = r.get("dir") or r.get("message") or ""
        out.append(f"  {stage:<{width}}  {status:<24} {_fmt_s(run.get('seconds')):>9}  {where}")
    nums = headline(result)
    if nums:
        out += ["", "Headline numbers:"]
        out += [f"  {LABELS[k]:<36} {_fmt(v)}" for k, v in nums.items()]
    rep = report_path(result)
    out += ["", f"Report: {rep}" if rep else "Report: (none: evaluation "
            + ("is a placeholder)" if (stages.get("evaluate") or {}).get("placeholder") else "did not run)")]
    wb = result.get("wandb_dirs") or []
    if wb:
        out.append("W&B runs (upload with `wandb sync <dir>`):")
        out += [f"  {d}" for d in wb]
    if result.get("ui_url"):
        out.append(f"Prefect run: {result['ui_url']}")
    return "\n".join(out)


__all__ = ["headline", "summary_markdown", "metrics_table", "publish", "format_summary", "wandb_run_dirs",
           "report_path"]
