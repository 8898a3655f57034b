"""The pipeline flow: ingest -> train_entropy -> patch -> train_blt -> evaluate.

``blt_pipeline(config)`` is the flow the CLI (``blt run``) and library users call; ``blt_pipeline_preset``
is the same pipeline with a three-field form (preset, overrides, workdir) for deployments and the UI.
Each stage is one Prefect task (``flows.tasks``) cached by its stage key, so a second run with the same
config, or the UI's Retry of a failed run, skips every finished stage; training resumes from ``last``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import Field

from blt_pipeline.config import PipelineConfig, load_config
from flows.artifacts import format_summary, headline, publish, wandb_run_dirs
from flows.tasks import STAGES, UPSTREAM, results_dir, run_stage_task


def _ui_url() -> str | None:
    """The flow run's page in the Prefect UI; None under the ephemeral API (no UI to link to)."""
    if not os.environ.get("PREFECT_API_URL"):
        return None
    try:
        from prefect.runtime import flow_run

        url = flow_run.ui_url
    except Exception:  # noqa: BLE001 - ephemeral runs may have no UI
        return None
    return url if url and url.startswith("http") else None


def _log_summary(result: dict) -> None:
    """Log the summary in runs started from a deployment (the UI); `blt run` prints it itself."""
    from prefect.runtime import deployment

    if deployment.id:
        get_run_logger().info("\n%s", format_summary(result))


def run_stages(config: PipelineConfig, until: str = "evaluate") -> dict:
    """Run the stages up to and including ``until`` inside the current flow run; returns the pipeline result.

    Stage flows use this too (``run_stages(cfg, until="patch")``), so every flow shares one cache.
    On failure the result so far is published as artifacts and the stage's exception is re-raised.
    """
    logger = get_run_logger()
    started = time.monotonic()
    stages = STAGES[: STAGES.index(until) + 1]
    result: dict = {
        "name": config.name, "workdir": str(Path(config.workdir).resolve()), "state": "Running",
        "stages": {}, "results_dir": str(results_dir(config)), "ui_url": _ui_url(),
    }

    def on_event(kind: str, info: dict) -> None:
        if kind == "start":
            logger.info("stage %s: starting (key %s)", info["stage"], (info.get("key") or "?")[:16])
        else:
            logger.info("stage %s: %s in %.1f s", info["stage"], info["status"], info["seconds"])

    current = None
    try:
        for stage in stages:
            current = stage
            upstream = {n: result["stages"][n] for n in UPSTREAM[stage]}
            result["stages"][stage] = run_stage_task(stage, config, upstream, on_event=on_event)
        result["state"] = "Completed"
    except BaseException as err:
        result["state"] = "Interrupted" if isinstance(err, KeyboardInterrupt) else "Failed"
        result["failed_stage"] = current
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
        raise
    finally:
        result["seconds"] = round(time.monotonic() - started, 3)
        result["wandb_dirs"] = [d for s in result["stages"].values() for d in wandb_run_dirs(s.get("dir"))]
        result["headline"] = headline(result)
        if result["state"] != "Interrupted":
            publish(result)
    return result


@flow(name="blt-pipeline", persist_result=False, log_prints=True)
def blt_pipeline(config: PipelineConfig) -> dict:
    """Byte Latent Transformer pipeline: ingest -> train_entropy -> patch -> train_blt -> evaluate.

    Args:
        config: the whole pipeline configuration (configs/*.yaml); finished stages are reused.
    """
    result = run_stages(config)
    _log_summary(result)
    return result


@flow(name="blt-pipeline-preset", persist_result=False, log_prints=True)
def blt_pipeline_preset(
    preset: str = Field(default="tiny", description="preset in configs/ (tiny = CPU, small = 1 GPU, blt-1b) "
                                                    "or a YAML path relative to the project"),
    overrides: list[str] = Field(default=[],
                                 description="key.path=value overrides, as `blt run --set` takes them, "
                                             "e.g. blt.train.max_steps=50"),
    workdir: str | None = Field(default=None, description="root of the stage outputs (default: the preset's)"),
) -> dict:
    """The BLT pipeline from a preset plus overrides (the deployments' form; same tasks and cache as blt-pipeline).

    Args:
        preset: preset name in configs/ or a YAML file.
        overrides: key.path=value overrides applied to the preset.
        workdir: root of the stage outputs.
    """
    config = load_config(preset, list(overrides or []), workdir=workdir)
    get_run_logger().info("resolved config: %s", config.model_dump_json(by_alias=True))
    result = run_stages(config)
    _log_summary(result)
    return result


def _env_defaults() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the pipeline flow for ``blt run``: an ephemeral Prefect API unless ``PREFECT_API_URL`` is set.

    Progress is logged per stage (and shown as a progress artifact during training); returns the pipeline
    result (``format_summary`` prints it). Ctrl-C raises KeyboardInterrupt here after the training launcher
    has killed its subprocess group.
    """
    _env_defaults()
    return blt_pipeline(cfg)


__all__ = ["blt_pipeline", "blt_pipeline_preset", "run_pipeline", "run_stages", "format_summary"]
