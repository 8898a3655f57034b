"""Prefect flow for the evaluate stage: runs the upstream stages (cached), then ``evaluate`` in its task.

A thin wrapper: ``flows.pipeline.run_stages(config, until="evaluate")`` runs ingest -> train_entropy ->
patch -> train_blt -> evaluate as Prefect tasks keyed by their stage keys (finished stages are skipped), then
the result of the evaluate task (``evaluation.evaluate.run_evaluate``) is returned, including ``report``
(the path of ``report.md``, also published as the pipeline's markdown artifact).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from blt_pipeline.config import PipelineConfig


@flow(name="evaluate", persist_result=False, log_prints=True)
def evaluate_flow(config: PipelineConfig) -> dict[str, Any]:
    """Evaluate the BLT against a FLOP-matched byte-level baseline (upstream stages run first, cached)."""
    from flows.pipeline import run_stages

    result = run_stages(config, until="evaluate")
    ev = dict(result["stages"]["evaluate"])
    s = ev.get("summary") or {}
    get_run_logger().info(
        "evaluate %s: BLT %s BPB, baseline %s BPB, %s bytes/patch; report %s",
        str(ev.get("key"))[:16], _fmt(s.get("blt_val_bpb")), _fmt(s.get("baseline_val_bpb")),
        _fmt(s.get("bytes_per_patch")), ev.get("report") or s.get("report"),
    )
    return ev


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


__all__ = ["evaluate_flow"]
