"""Stage ``train_entropy``: the small causal byte LM whose next-byte entropies drive patching.

Key config ``{"entropy": cfg.entropy, "seed": cfg.seed}``, inputs ``{"ingest": key}``. Output directory:
``model.pt`` (``training.artifacts``), ``metrics.jsonl``, ``checkpoints/`` (resume), ``train.log``, ``wandb/``
and the manifest with summary ``{val_bpb, train_loss, steps, bytes_seen, bytes_per_s, seconds}``. Training
runs in a subprocess (``training.launch``); an interrupted run resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

from typing import Any

from blt_pipeline.config import PipelineConfig
from blt_pipeline.stage import stage_key
from training.launch import run_training_stage

STAGE = "train_entropy"
VERSION = "1"


def key_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"entropy": cfg.entropy, "seed": cfg.seed}


def key_for(cfg: PipelineConfig, ingest: dict) -> str:
    """The stage key ``run_train_entropy`` will use (for Prefect's cache), without running anything."""
    return stage_key(STAGE, key_config(cfg), {"ingest": ingest["key"]}, VERSION)


def run_train_entropy(cfg: PipelineConfig, ingest: dict) -> dict[str, Any]:
    """Train (or reuse, or resume) the entropy model on the ingest stage's doc shards."""
    return run_training_stage(STAGE, cfg, key_config(cfg), {"ingest": ingest}, VERSION)


__all__ = ["STAGE", "VERSION", "key_for", "run_train_entropy"]
