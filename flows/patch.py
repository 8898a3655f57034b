"""Prefect flow for the patch stage: a thin wrapper over ``data.patch_stage.run_patch``.

``patch_flow(config)`` runs ingest and train_entropy (reused when finished) and then the patch stage, each as
the shared Prefect task of ``flows.tasks`` (cached by stage key, the same cache the pipeline flow uses), via
``flows.pipeline.run_stages(config, until="patch")``. Returns the patch stage's result dict.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from blt_pipeline.config import PipelineConfig


@flow(name="patch", persist_result=False, log_prints=True)
def patch_flow(config: PipelineConfig) -> dict[str, Any]:
    """Entropies and patch lengths of every document (runs ingest and train_entropy first when needed).

    Args:
        config: the pipeline configuration; ``config.patch`` configures this stage.
    """
    from flows.pipeline import run_stages  # lazy: keeps importing this module cheap

    result = run_stages(config, until="patch")["stages"]["patch"]
    s = result.get("summary", {})
    get_run_logger().info(
        "patch %s: mode %s, θ=%s, %s bytes/patch, %s docs, %s bytes/s -> %s",
        str(result.get("key"))[:16], s.get("mode"), s.get("threshold"), s.get("mean_bytes_per_patch"),
        s.get("docs"), s.get("bytes_per_s"), result.get("dir"),
    )
    return result


__all__ = ["patch_flow"]
