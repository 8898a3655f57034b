"""Stage ``train_blt`` (the Byte Latent Transformer) and ``train_baseline`` (a FLOP-matched byte LM).

``train_blt``: key config ``{"blt": cfg.blt, "seed": cfg.seed}``, inputs ``{"ingest", "patch"}``. Rows are
packed from documents with their stored patch lengths: ``blt.train.seq_len`` patches per row, at most
``max_bytes_per_row`` bytes (``training.packing``). Outputs as ``train_entropy``: ``model.pt`` (kind "blt"),
``metrics.jsonl``, ``checkpoints/``, manifest summary ``{val_bpb, train_loss, steps, bytes_seen,
bytes_per_s, seconds}``.

``train_baseline``: a ``ByteLM`` of shape ``eval.baseline_model`` with full attention over rows of
``seq_len`` bytes (default: the BLT's byte cap), trained like the BLT (``blt.train``) for ``max_steps``
(chosen by the caller to match the BLT's training FLOPs; ``training.run.baseline_setup`` gives the exact
model/train configs so the caller can compute FLOPs with ``blt_model.flops.bytelm_flops_per_byte``).
"""

from __future__ import annotations

from typing import Any

from blt_pipeline.config import PipelineConfig
from blt_pipeline.stage import stage_key
from training.launch import run_training_stage
from training.run import baseline_setup

STAGE = "train_blt"
BASELINE_STAGE = "train_baseline"
VERSION = "1"


def key_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"blt": cfg.blt, "seed": cfg.seed}


def key_for(cfg: PipelineConfig, ingest: dict, patch: dict) -> str:
    """The stage key ``run_train_blt`` will use (for Prefect's cache), without running anything."""
    return stage_key(STAGE, key_config(cfg), {"ingest": ingest["key"], "patch": patch["key"]}, VERSION)


def run_train_blt(cfg: PipelineConfig, ingest: dict, patch: dict) -> dict[str, Any]:
    """Train (or reuse, or resume) the BLT on doc shards plus the patch stage's aligned patch shards."""
    return run_training_stage(STAGE, cfg, key_config(cfg), {"ingest": ingest, "patch": patch}, VERSION)


def baseline_key_config(cfg: PipelineConfig, max_steps: int, seq_len: int | None = None) -> dict[str, Any]:
    model, train = baseline_setup(cfg, seq_len, max_steps)
    return {"model": model, "train": train, "seed": cfg.seed}


def run_train_baseline(cfg: PipelineConfig, ingest: dict, max_steps: int, *,
                       seq_len: int | None = None) -> dict[str, Any]:
    """Train (or reuse) the byte-level baseline (kind "baseline") for ``max_steps`` steps."""
    return run_training_stage(BASELINE_STAGE, cfg, baseline_key_config(cfg, max_steps, seq_len),
                              {"ingest": ingest}, VERSION, max_steps=max_steps, seq_len=seq_len)


__all__ = ["BASELINE_STAGE", "STAGE", "VERSION", "baseline_key_config", "key_for", "run_train_baseline",
           "run_train_blt"]
