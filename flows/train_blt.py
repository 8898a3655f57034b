"""Prefect flow for the ``train_blt`` stage: ingest, train_entropy, patch (all cached), then the BLT's training.

A thin wrapper over ``flows.pipeline.run_stages`` (one cached Prefect task per stage, shared with the pipeline
flow); training runs in a subprocess (``training.launch``), so DDP/FSDP never re-executes the Prefect engine.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from blt_pipeline.config import PipelineConfig


@flow(name="train-blt", persist_result=False, log_prints=True)
def train_blt_flow(config: PipelineConfig) -> dict[str, Any]:
    """Train the Byte Latent Transformer (after ingest, train_entropy, patch); returns the train_blt result.

    Args:
        config: the whole pipeline configuration; finished upstream stages are reused.
    """
    from flows.pipeline import run_stages

    return run_stages(config, until="train_blt")["stages"]["train_blt"]


__all__ = ["train_blt_flow"]
