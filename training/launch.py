"""Launch the training entry point as a subprocess and stream its output.

``launch_training`` writes the resolved config to ``<stage dir>/run_config.json``, starts
``python -m training.run ...`` **in its own process group** (``start_new_session``), forwards every output
line (all ranks: DDP children inherit the pipe) to the Prefect run logger when called inside a flow/task run
(else to stdout) and to ``<stage dir>/train.log``, and reads the result from ``<stage dir>/train_result.json``
(written by rank 0). Lightning's DDP launcher then re-executes *our* module, never the Prefect engine.

Interrupts: KeyboardInterrupt, SIGTERM (while launching from the main thread) or any exception in the
parent kills the whole training process group (SIGTERM, then SIGKILL after a grace period). If the parent
dies without a chance to clean up (SIGKILL), the child notices its parent changed and exits (``training.run``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from blt_pipeline.stage import atomic_write_json
from training.run import CONFIG_ERROR_EXIT, PARENT_ENV, RESULT_FILE, TrainingConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
KILL_GRACE_S = 15.0
STRAGGLER_GRACE_S = 20.0


class TrainingFailed(RuntimeError):
    """The training subprocess failed; the message holds its exit code and last output lines."""


def _line_sink():
    """A function that logs one line: Prefect's run logger inside a run, else print."""
    try:
        from prefect import get_run_logger

        logger = get_run_logger()
        return logger.info
    except Exception:  # noqa: BLE001 - MissingContextError or Prefect absent: plain stdout
        return lambda line: print(line, flush=True)


def _kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stray ranks of an exited leader
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into SystemExit while training runs (main thread only), so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def training_command(stage: str, config_path: Path, out_dir: Path, key: str, ingest_dir: str | Path,
                     patch_dir: str | Path | None = None, max_steps: int | None = None,
                     seq_len: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "training.run", "--stage", stage, "--config", str(config_path),
           "--out", str(out_dir), "--key", key, "--ingest", str(Path(ingest_dir).resolve())]
    if patch_dir is not None:
        cmd += ["--patch", str(Path(patch_dir).resolve())]
    if max_steps is not None:
        cmd += ["--max-steps", str(int(max_steps))]
    if seq_len is not None:
        cmd += ["--seq-len", str(int(seq_len))]
    return cmd


def launch_training(stage: str, cfg, out_dir: str | Path, key: str, ingest_dir: str | Path,
                    patch_dir: str | Path | None = None, *, max_steps: int | None = None,
                    seq_len: int | None = None, env: dict[str, str] | None = None,
                    sink=None) -> dict[str, Any]:
    """Run one training stage in a subprocess; returns the parsed ``train_result.json``."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "run_config.json"
    atomic_write_json(config_path, cfg.to_json_dict())
    result_path = out_dir / RESULT_FILE
    with contextlib.suppress(FileNotFoundError):
        result_path.unlink()  # never read a stale result
    cmd = training_command(stage, config_path, out_dir, key, ingest_dir, patch_dir, max_steps, seq_len)
    child_env = dict(os.environ)
    # a W&B service of this process (e.g. an in-process evaluate run) must not be shared with the child
    child_env.pop("WANDB_SERVICE", None)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH")) if p)
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env[PARENT_ENV] = str(os.getpid())
    log = sink or _line_sink()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    log(f"{stage}: launching {' '.join(cmd[1:4])} ... (log: {out_dir / 'train.log'})")
    with _sigterm_raises(), open(out_dir / "train.log", "a", buffering=1) as logfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, start_new_session=True, text=True, bufsize=1, errors="replace")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                logfile.write(line + "\n")
                tail.append(line)
                log(line)

        # the pipe is read in a thread: other ranks may hold it open after rank 0 (the leader) exits, e.g.
        # stuck in a collective after rank 0 crashed; the leader's exit is what ends the run
        reader = threading.Thread(target=pump, daemon=True, name=f"{stage}-log")
        reader.start()
        try:
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            reader.join(timeout=5)
            raise
        reader.join(timeout=STRAGGLER_GRACE_S if rc == 0 else 1.0)
        _kill_group(proc, grace_s=0.0)  # ranks or helpers left behind by the leader
        reader.join(timeout=5)
    if rc == CONFIG_ERROR_EXIT:
        raise TrainingConfigError(f"{stage}: " + "\n".join(list(tail)[-5:]))
    if rc != 0:
        raise TrainingFailed(f"{stage}: training exited with code {rc}; last lines:\n" + "\n".join(tail))
    try:
        return json.loads(result_path.read_text())
    except (OSError, ValueError) as err:
        raise TrainingFailed(f"{stage}: training exited 0 but {result_path} is missing or invalid: {err}") from None


__all__ = ["TrainingConfigError", "TrainingFailed", "launch_training", "training_command"]


# ----------------------------------------------------------------------------------------------- stages
def manifest_fields(out_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Manifest fields of a training stage: files (model, metrics), summary, W&B run, devices."""
    from blt_pipeline.stage import sha256_file

    files = {}
    for rel in (result.get("model", "model.pt"), result.get("metrics", "metrics.jsonl")):
        p = out_dir / rel
        if p.exists():
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return {"files": files, "summary": result.get("summary", {}), "kind": result.get("kind"),
            "wandb": result.get("wandb"), "devices": result.get("devices"),
            "checkpoints": result.get("checkpoints")}


def run_training_stage(stage: str, cfg, key_config: Any, upstream: dict[str, dict], version: str, *,
                       max_steps: int | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """``run_stage`` for a training stage: the build launches ``training.run`` (resuming from ``last``)."""
    from blt_pipeline.stage import run_stage, stage_key

    inputs = {name: res["key"] for name, res in upstream.items()}
    key = stage_key(stage, key_config, inputs, version)

    def build(out: Path) -> dict[str, Any]:
        result = launch_training(stage, cfg, out, key, upstream["ingest"]["dir"],
                                 upstream["patch"]["dir"] if "patch" in upstream else None,
                                 max_steps=max_steps, seq_len=seq_len)
        return manifest_fields(Path(out), result)

    result = run_stage(stage, cfg.workdir, key_config, inputs, version, build)
    assert result["key"] == key, "stage key formula drifted from blt_pipeline.stage.run_stage"
    return result
