"""Prefect flow for the ``train_entropy`` stage: ingest (cached), then the entropy model's training.

A thin wrapper: ``flows.pipeline.run_stages`` runs each stage as its Prefect task (``flows.tasks``: cached by
stage key, persisted results, retries that resume from ``last``), so this flow shares its cache with the
pipeline flow. The training itself runs in a subprocess (``training.launch``), so ``devices > 1`` (DDP) never
re-executes the Prefect engine.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from blt_pipeline.config import PipelineConfig


@flow(name="train-entropy", persist_result=False, log_prints=True)
def train_entropy_flow(config: PipelineConfig) -> dict[str, Any]:
    """Train the entropy model (after ingest); returns the train_entropy stage result.

    Args:
        config: the whole pipeline configuration; finished upstream stages are reused.
    """
    from flows.pipeline import run_stages

    return run_stages(config, until="train_entropy")["stages"]["train_entropy"]


__all__ = ["train_entropy_flow"]
