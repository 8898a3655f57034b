"""Weights & Biases for the training stages (through Lightning's ``WandbLogger``).

- Mode: ``cfg.wandb.mode``, else ``WANDB_MODE`` from the environment, else ``"offline"`` (no key, no network
  needed; ``wandb sync <stage dir>/wandb/offline-run-*`` uploads later). ``"disabled"``: no W&B at all (the
  local ``metrics.jsonl`` is always written).
- One group per pipeline run (``cfg.wandb.group`` or ``cfg.name``), ``job_type`` = stage name, a stable run id
  per stage key (``f"{stage}-{key[:16]}"``, ``resume="allow"``) so a resumed stage continues its run, and the
  config = the full resolved pipeline config + stage keys + git revision.
- Metrics share the x-axis ``train/bytes_seen`` (``define_metric`` per metric name, so runs with different
  batch shapes line up): ``train/loss``, ``train/bpb``, ``train/lr``, ``val/bpb``, ``perf/bytes_per_s``,
  ``perf/mfu``...
- Online only: doc/patch shards as *reference* artifacts (URIs, sizes, checksums; bytes never move) and, with
  ``cfg.wandb.log_model``, checkpoints as model artifacts (Lightning's ``log_model``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

X_AXIS = "train/bytes_seen"
METRICS = (
    "train/loss", "train/bpb", "train/lr", "val/bpb", "val/loss", "val/bytes", "perf/bytes_per_s",
    "perf/bytes_per_s_per_device", "perf/flops_per_s_per_device", "perf/mfu",
)


def resolve_mode(wandb_cfg) -> str:
    mode = wandb_cfg.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"W&B mode must be offline, online or disabled, got {mode!r}")
    return mode


def run_id(stage: str, key: str) -> str:
    return f"{stage}-{key[:16]}"


def make_logger(cfg, stage: str, key: str, out_dir: str | Path, extra_config: dict[str, Any] | None = None):
    """A ``WandbLogger`` for this stage, or None when W&B is disabled."""
    mode = resolve_mode(cfg.wandb)
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    from blt_pipeline.stage import code_version

    os.environ["WANDB_MODE"] = mode  # ranks > 0 and wandb's service see the same mode
    config = {"pipeline": cfg.to_json_dict(), "stage": stage, "stage_key": key, "code_version": code_version(),
              **(extra_config or {})}
    kwargs: dict[str, Any] = dict(
        project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group or cfg.name,
        job_type=stage, id=run_id(stage, key), name=f"{cfg.name}-{stage}", resume="allow",
        save_dir=str(out_dir), config=config, offline=(mode == "offline"),
    )
    if mode == "online" and cfg.wandb.log_model:
        kwargs["log_model"] = True
    return WandbLogger(**kwargs)


def setup_run(logger, cfg, inputs: dict[str, str | None]) -> None:
    """On rank 0: the shared x-axis and, online, shard reference artifacts. ``inputs``: stage -> directory."""
    if logger is None:
        return
    run = logger.experiment
    if not hasattr(run, "define_metric"):
        return
    run.define_metric(X_AXIS)
    for name in METRICS:
        run.define_metric(name, step_metric=X_AXIS)
    if resolve_mode(cfg.wandb) != "online":
        return
    import wandb

    for stage, directory in inputs.items():
        if not directory:
            continue
        art = wandb.Artifact(f"{cfg.name}-{stage}-shards", type="dataset",
                             metadata={"stage": stage, "dir": str(directory)})
        art.add_reference(Path(directory).resolve().as_uri(), max_objects=100_000)
        run.use_artifact(art)


def offline_runs(stage_dir: str | Path) -> list[Path]:
    """Offline run directories of a stage (oldest first)."""
    return sorted((Path(stage_dir) / "wandb").glob("offline-run-*"))


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """An offline run's records via ``wandb leet inspect --json`` (``wandb.Api`` cannot read offline runs).

    Returns ``{"run": {run_id, run_group, job_type, ...}, "config": {...}, "history": [rows],
    "metrics": {name: step_metric}}``. Used by tests and for quick local inspection.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb")) if run_dir.is_dir() else [run_dir]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe) if exe.exists() else "wandb", "leet", "inspect", "--json", str(files[0])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"wandb leet inspect failed: {out.stderr[-2000:]}")
    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    history: list[dict] = []
    metrics: dict[str, str | None] = {}
    for line in out.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":
            run = dict(rec["run"])
            config.update((run.pop("config", {}) or {}).get("update", {}))
        elif kind == "config":
            config.update((rec["config"] or {}).get("update", {}))
        elif kind == "history":
            history.append(rec["history"]["item"])
        elif kind == "metric":
            m = rec["metric"]
            name = m.get("name") or m.get("glob_name")
            metrics[name] = m.get("step_metric")
    return {"run": run, "config": config, "history": history, "metrics": metrics}


__all__ = ["METRICS", "X_AXIS", "make_logger", "offline_runs", "read_offline_run", "resolve_mode", "run_id",
           "setup_run"]
