"""Prefect tasks, one per stage, shared by the pipeline flow and the stage flows.

Each task is a thin wrapper over a stage library function (``data.ingest.run_ingest`` ...). Caching has two
layers:

1. The stage contract (``blt_pipeline.stage.run_stage``): a stage whose ``manifest.json`` exists and
   validates returns at once, whoever calls it.
2. Prefect's task cache: the cache key is the **stage key** (``stage_key_for``: computed from the config and
   the upstream stage keys, without running anything) and results are persisted as JSON under
   ``<workdir>/.prefect-results``. So a new flow run with the same config and the UI's Retry of a failed run
   skip finished stages without even entering the task body.

A Prefect cache record never outlives its stage directory: ``run_stage_task`` (below) checks the manifest
before calling a task and refreshes the cache when the directory is missing, incomplete, or was rebuilt
since the record was written.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from blt_pipeline.config import ConfigError, PipelineConfig
from blt_pipeline.stage import MANIFEST, read_manifest, stage_dir

STAGES: tuple[str, ...] = ("ingest", "train_entropy", "patch", "train_blt", "evaluate")

#: upstream stages, in the order the stage function takes them (CONTRACTS.md)
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "train_entropy": ("ingest",),
    "patch": ("ingest", "train_entropy"),
    "train_blt": ("ingest", "patch"),
    "evaluate": ("ingest", "train_entropy", "patch", "train_blt"),
}

#: (module, function) of each stage library function
RUNNERS: dict[str, tuple[str, str]] = {
    "ingest": ("data.ingest", "run_ingest"),
    "train_entropy": ("training.entropy_stage", "run_train_entropy"),
    "patch": ("data.patch_stage", "run_patch"),
    "train_blt": ("training.blt_stage", "run_train_blt"),
    "evaluate": ("evaluation.evaluate", "run_evaluate"),
}

TRAINING_STAGES = ("train_entropy", "train_blt")
RESULTS_DIR = ".prefect-results"


def results_dir(cfg: PipelineConfig) -> Path:
    """Where persisted Prefect task results (and cache records) live: ``<workdir>/.prefect-results``."""
    return Path(cfg.workdir).resolve() / RESULTS_DIR


def _module(stage: str):
    return importlib.import_module(RUNNERS[stage][0])


def stage_available(stage: str) -> bool:
    """True when the stage's library module exists (only ``evaluate`` may be missing, see ``run_evaluate``)."""
    return importlib.util.find_spec(RUNNERS[stage][0]) is not None


# --------------------------------------------------------------------------------------------- stage keys
def _upstream_keys(stage: str, upstream: dict[str, Any]) -> dict[str, str] | None:
    keys = {}
    for name in UPSTREAM[stage]:
        up = upstream.get(name)
        key = up.get("key") if isinstance(up, dict) else up
        if not key:
            return None
        keys[name] = key
    return keys


def stage_key_for(cfg: PipelineConfig, stage: str, upstream: dict[str, Any]) -> str | None:
    """The key ``run_<stage>`` will use, computed without running it; None when it can't be known cheaply.

    ``upstream`` maps upstream stage names to their result dicts (or keys). The stage module's own
    ``key_for(cfg, *upstream_results)`` is used when it exports one (the authoritative answer); otherwise
    nothing is guessed and the Prefect cache layer is skipped for that stage (the stage's manifest check
    still makes a rerun cheap). None also when an upstream key is unknown.
    """
    keys = _upstream_keys(stage, upstream)
    if keys is None or not stage_available(stage):
        return None
    mod = _module(stage)
    key_for = getattr(mod, "key_for", None)
    if key_for is None:
        return None
    args = [upstream[n] if isinstance(upstream[n], dict) else {"key": upstream[n]} for n in UPSTREAM[stage]]
    try:
        return key_for(cfg, *args)
    except Exception as err:  # noqa: BLE001 - an unknown key only costs the Prefect cache layer
        with contextlib.suppress(Exception):
            from prefect import get_run_logger

            get_run_logger().warning("%s: cannot compute the stage key ahead (%s); Prefect cache skipped",
                                     stage, err)
        return None


def complete_manifest(cfg: PipelineConfig, stage: str, key: str | None) -> dict | None:
    """The valid manifest of ``stage`` at ``key`` under ``cfg.workdir``, else None."""
    if not key:
        return None
    return read_manifest(stage_dir(cfg.workdir, stage, key), key)


def _cache_key(context, parameters: dict[str, Any]) -> str | None:
    """cache_key_fn: ``<stage>-<stage key>``; None (no cache) when the key is unknown."""
    stage = context.task.name
    cfg = parameters["config"]
    upstream = {n: parameters.get(n) for n in UPSTREAM[stage]}
    key = stage_key_for(cfg, stage, upstream)
    return f"{stage}-{key}" if key else None


# --------------------------------------------------------------------------------------------- retries
def _non_retriable() -> tuple[type[BaseException], ...]:
    import pydantic

    errors: list[type[BaseException]] = [ConfigError, ValueError, TypeError, KeyError, pydantic.ValidationError,
                                         NotImplementedError, FileNotFoundError]
    with contextlib.suppress(ImportError):
        from training.launch import TrainingConfigError  # type: ignore[attr-defined]

        errors.append(TrainingConfigError)
    return tuple(errors)


def retry_on_infrastructure(task, task_run, state) -> bool:
    """retry_condition_fn: retry crashes, OOM kills, lost devices, I/O hiccups; never a bad config or input."""
    try:
        state.result()
    except _non_retriable():
        return False
    except BaseException:  # noqa: BLE001 - any other failure is treated as infrastructure
        return True
    return False


def training_retries() -> int:
    """Retries of a training task (env ``BLT_TRAIN_RETRIES``, default 2); resumed from ``last`` each time."""
    return int(os.environ.get("BLT_TRAIN_RETRIES", "2"))


def training_retry_delay() -> float:
    """Base of the exponential backoff between training retries (env ``BLT_TRAIN_RETRY_DELAY_S``, default 30)."""
    return float(os.environ.get("BLT_TRAIN_RETRY_DELAY_S", "30"))


# --------------------------------------------------------------------------------------------- progress
def _read_progress(metrics_path: Path) -> tuple[int, float | None]:
    """(latest step, latest train loss) from a training stage's metrics.jsonl; tolerant of partial lines."""
    step, loss = 0, None
    try:
        with open(metrics_path, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(row, dict):
                    continue
                s = row.get("step", row.get("trainer/global_step", row.get("global_step")))
                if isinstance(s, (int, float)):
                    step = max(step, int(s))
                for name in ("train/loss", "loss", "train_loss"):
                    if isinstance(row.get(name), (int, float)):
                        loss = float(row[name])
                        break
    except OSError:
        pass
    return step, loss


class ProgressWatcher:
    """Polls ``<stage dir>/metrics.jsonl`` in a thread and mirrors ``step / max_steps`` into a Prefect
    progress artifact. Training runs in a subprocess that writes the file; nothing else is needed from it."""

    def __init__(self, stage: str, directory: Path | None, max_steps: int, key: str, interval_s: float = 2.0):
        self.stage, self.directory, self.max_steps, self.key = stage, directory, max_steps, key
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._artifact_id = None
        self.last_step = 0

    def _update(self, final: bool = False) -> None:
        from prefect.artifacts import update_progress_artifact

        if self._artifact_id is None or self.directory is None:
            return
        step, loss = _read_progress(self.directory / "metrics.jsonl")
        if step == self.last_step and not final:
            return
        self.last_step = step
        pct = 100.0 if final else min(99.9, 100.0 * step / max(1, self.max_steps))
        desc = f"{self.stage}: step {step}/{self.max_steps}" + (f", loss {loss:.4f}" if loss is not None else "")
        with contextlib.suppress(Exception):  # progress is best effort; never fail training over it
            update_progress_artifact(self._artifact_id, pct, description=desc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def __enter__(self) -> ProgressWatcher:
        from prefect.artifacts import create_progress_artifact

        with contextlib.suppress(Exception):
            self._artifact_id = create_progress_artifact(
                0.0, key=self.key, description=f"{self.stage}: starting ({self.max_steps} steps)")
        if self._artifact_id is not None and self.directory is not None:
            ctx = contextvars.copy_context()  # the Prefect client settings live in context variables
            self._thread = threading.Thread(target=ctx.run, args=(self._loop,), daemon=True,
                                            name=f"progress-{self.stage}")
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exc_type is None:
            self._update(final=True)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() and c.isascii() else "-" for c in raw).strip("-")[:200] or "blt"


# --------------------------------------------------------------------------------------------- task bodies
def _call_stage(stage: str, config: PipelineConfig, upstream: list[dict]) -> dict:
    fn = getattr(_module(stage), RUNNERS[stage][1])
    return fn(config, *upstream)


def _with_written_at(result: dict) -> dict:
    """Add the manifest's ``written_at`` (identifies one build of the directory) to a stage result."""
    out = dict(result)
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(Path(result["manifest"]).read_text())
        out["written_at"] = manifest.get("written_at")
        out["build_seconds"] = (manifest.get("timing") or {}).get("seconds")
    return out


_TASK_OPTS = dict(persist_result=True, result_serializer="json", cache_key_fn=_cache_key, log_prints=True)


@task(name="ingest", **_TASK_OPTS)
def ingest_task(config: PipelineConfig) -> dict:
    return _with_written_at(_call_stage("ingest", config, []))


@task(name="patch", **_TASK_OPTS)
def patch_task(config: PipelineConfig, ingest: dict, train_entropy: dict) -> dict:
    return _with_written_at(_call_stage("patch", config, [ingest, train_entropy]))


def _train(stage: str, config: PipelineConfig, upstream: list[dict], ups: dict[str, dict]) -> dict:
    section = config.entropy if stage == "train_entropy" else config.blt
    key = stage_key_for(config, stage, ups)
    directory = stage_dir(config.workdir, stage, key) if key else None
    if directory is None:  # no key_for: watch the newest directory of the stage instead
        directory = _newest_dir(Path(config.workdir) / stage)
    with ProgressWatcher(stage, directory, section.train.max_steps,
                         key=artifact_key(config.name, stage, "progress")):
        return _with_written_at(_call_stage(stage, config, upstream))


def _newest_dir(root: Path) -> Path | None:
    dirs = [d for d in root.glob("*") if d.is_dir()] if root.exists() else []
    return max(dirs, key=lambda d: d.stat().st_mtime) if dirs else None


_TRAIN_OPTS = dict(_TASK_OPTS, retries=2, retry_delay_seconds=exponential_backoff(30),
                   retry_jitter_factor=0.2, retry_condition_fn=retry_on_infrastructure)


@task(name="train_entropy", **_TRAIN_OPTS)
def train_entropy_task(config: PipelineConfig, ingest: dict) -> dict:
    return _train("train_entropy", config, [ingest], {"ingest": ingest})


@task(name="train_blt", **_TRAIN_OPTS)
def train_blt_task(config: PipelineConfig, ingest: dict, patch: dict) -> dict:
    return _train("train_blt", config, [ingest, patch], {"ingest": ingest, "patch": patch})


PLACEHOLDER_MESSAGE = (
    "evaluation stage not implemented yet (no module evaluation.evaluate): placeholder, no numbers were computed"
)


@task(name="evaluate", **_TASK_OPTS)
def evaluate_task(config: PipelineConfig, ingest: dict, train_entropy: dict, patch: dict, train_blt: dict) -> dict:
    return _with_written_at(_call_stage("evaluate", config, [ingest, train_entropy, patch, train_blt]))


def evaluate_placeholder() -> dict:
    """What the pipeline records while ``evaluation.evaluate`` does not exist: says so, carries no numbers."""
    return {"stage": "evaluate", "key": None, "dir": None, "cached": False, "placeholder": True,
            "summary": {}, "message": PLACEHOLDER_MESSAGE}


TASKS: dict[str, Any] = {
    "ingest": ingest_task,
    "train_entropy": train_entropy_task,
    "patch": patch_task,
    "train_blt": train_blt_task,
    "evaluate": evaluate_task,
}


# --------------------------------------------------------------------------------------------- the runner
def run_stage_task(stage: str, config: PipelineConfig, upstream: dict[str, dict],
                   on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Run one stage's task inside a flow and return its result plus a ``run`` record.

    ``run`` = ``{"status": "ran"|"reused"|"cached"|"placeholder", "layer", "seconds", "key_checked"}``:
    *cached*: Prefect's cache answered, the body did not run; *reused*: the body ran and found the stage
    complete on disk; *ran*: the stage was built (or resumed) now. A Prefect cache record whose stage
    directory is gone, incomplete, or was rebuilt since is refreshed, never trusted.
    """
    if stage == "evaluate" and not stage_available("evaluate"):
        started = time.monotonic()
        result = evaluate_placeholder()
        result["run"] = {"status": "placeholder", "layer": None, "seconds": round(time.monotonic() - started, 3)}
        return result

    storage = results_dir(config)
    storage.mkdir(parents=True, exist_ok=True)
    t = TASKS[stage]
    opts: dict[str, Any] = {"result_storage": storage}
    if stage in TRAINING_STAGES:
        opts.update(retries=training_retries(), retry_delay_seconds=exponential_backoff(training_retry_delay()))
    key = stage_key_for(config, stage, upstream)
    manifest = complete_manifest(config, stage, key)
    if key is not None and manifest is None:
        opts["refresh_cache"] = True  # directory missing/incomplete: a cached record would lie
    kwargs = {"config": config, **{n: upstream[n] for n in UPSTREAM[stage]}}
    if on_event:
        on_event("start", {"stage": stage, "key": key})
    started = time.monotonic()
    state = t.with_options(**opts)(**kwargs, return_state=True)
    result = state.result()  # raises the stage's exception on failure
    status = "cached" if state.name == "Cached" else ("reused" if result.get("cached") else "ran")
    if status == "cached" and (manifest is None or manifest.get("written_at") != result.get("written_at")):
        # the directory was rebuilt (or removed) behind Prefect's back: refresh from disk (cheap)
        opts["refresh_cache"] = True
        state = t.with_options(**opts)(**kwargs, return_state=True)
        result = state.result()
        status = "reused" if result.get("cached") else "ran"
    result = dict(result)
    result["run"] = {
        "status": status,
        "layer": {"cached": "prefect", "reused": "stage"}.get(status),
        "seconds": round(time.monotonic() - started, 3),
        "key_matches": None if key is None else key == result.get("key"),
    }
    if key is not None and key != result.get("key"):
        from prefect import get_run_logger

        get_run_logger().warning("%s: key_for() gave %s but the stage used %s; fix the stage's key_for",
                                 stage, key[:16], str(result.get("key"))[:16])
    if on_event:
        on_event("done", {"stage": stage, **result["run"]})
    return result


__all__ = [
    "STAGES", "UPSTREAM", "RUNNERS", "TASKS", "results_dir", "stage_key_for", "complete_manifest",
    "retry_on_infrastructure", "run_stage_task", "evaluate_placeholder", "ProgressWatcher", "artifact_key",
    "stage_available",
]

_ = MANIFEST
