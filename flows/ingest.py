"""Prefect flow for the ingest stage: a thin wrapper over ``data.ingest.run_ingest``."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from blt_pipeline.config import PipelineConfig
from data.ingest import run_ingest


@task(name="ingest")
def ingest_task(config: PipelineConfig) -> dict[str, Any]:
    result = run_ingest(config)
    s = result["summary"]
    get_run_logger().info(
        "ingest %s (%s): %s docs, %s bytes, %s shards (train %s / val %s) in %s",
        result["key"][:16], "cached" if result["cached"] else "built", s.get("docs"), s.get("bytes"),
        s.get("shards"), s.get("train_shards"), s.get("val_shards"), result["dir"],
    )
    return result


@flow(name="ingest")
def ingest_flow(config: PipelineConfig) -> dict[str, Any]:
    """Ingest the configured sources into Arrow doc shards; returns the stage result dict."""
    return ingest_task(config)
