"""Training entry point, run as its own process (never inside the Prefect engine):

    python -m training.run --stage train_entropy|train_blt|train_baseline --config <resolved config json>
        --out <stage dir> --key <stage key> --ingest <ingest dir> [--patch <patch dir>]
        [--max-steps N] [--seq-len N]

It trains with Lightning, writes ``<out>/metrics.jsonl`` (rank 0), ``<out>/checkpoints/`` (``step-*.ckpt``
every ``ckpt_every_n_steps`` plus ``last.ckpt``; a rerun resumes from ``last.ckpt`` with weights, optimizer,
scheduler and data position restored), ``<out>/model.pt`` and finally ``<out>/train_result.json`` (rank 0).

Devices. ``train.devices`` > 1 (or ``num_nodes`` > 1) uses ``strategy="ddp"`` unless ``fsdp`` is asked for.
Lightning's DDP launcher re-executes *this* command once per extra local rank, which is why training is a
module of its own and not the Prefect task's process. On CPU the backend is gloo; FSDP needs GPUs.
Multi-node: start this command under ``torchrun`` (``torchrun --nnodes N --nproc-per-node G -m training.run
...``) or in a SLURM allocation (``srun python -m training.run ...`` with one task per GPU); Lightning reads
the ``torchrun``/SLURM environment (``MASTER_ADDR``, ``WORLD_SIZE``, ``SLURM_*``) and does not relaunch.
Set ``devices``/``num_nodes`` in the config to match. Each rank uses ``cores // local ranks`` torch threads
(capped by ``OMP_NUM_THREADS`` when set).

Exit codes: 0 ok, 3 configuration error (not worth retrying), anything else a failure.
Test hook: ``BLT_FAIL_AFTER_STEPS=N`` makes the run fail after N steps (``training.callbacks``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

CONFIG_ERROR_EXIT = 3
RESULT_FILE = "train_result.json"
CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
PARENT_ENV = "BLT_PARENT_PID"


class TrainingConfigError(ValueError):
    """The training configuration cannot work (e.g. FSDP on CPU, rows longer than the model's max_seqlen)."""


# ----------------------------------------------------------------------------------------------- stage specs
def baseline_setup(cfg, seq_len: int | None = None, max_steps: int | None = None):
    """The byte-level baseline: ``(EntropyModelConfig, TrainConfig)``.

    Shape ``cfg.eval.baseline_model``; rows of ``seq_len`` bytes (default: the BLT's byte cap,
    ``blt.train.max_bytes_per_row`` or ``seq_len * 8``) with full causal attention (window = row length);
    optimisation as ``blt.train`` (batch size, lr schedule), ``max_steps`` as given (FLOP-matched by the caller).
    """
    from blt_model.config import EntropyModelConfig

    bt = cfg.blt.train
    row = seq_len or bt.max_bytes_per_row or bt.seq_len * 8
    model = EntropyModelConfig(shape=cfg.eval.baseline_model, window=row, max_seqlen=row)
    train = bt.model_copy(update={"seq_len": row, "max_bytes_per_row": None,
                                  **({"max_steps": max_steps} if max_steps else {})})
    return model, train


def stage_spec(cfg, stage: str, seq_len: int | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """kind, model config, train config and packing mode of a training stage."""
    if stage == "train_entropy":
        spec = {"kind": "entropy", "model": cfg.entropy.model, "train": cfg.entropy.train, "mode": "bytes"}
    elif stage == "train_blt":
        spec = {"kind": "blt", "model": cfg.blt.model, "train": cfg.blt.train, "mode": "patches"}
    elif stage == "train_baseline":
        model, train = baseline_setup(cfg, seq_len, max_steps)
        spec = {"kind": "baseline", "model": model, "train": train, "mode": "bytes"}
    else:
        raise TrainingConfigError(f"unknown training stage {stage!r}")
    if max_steps and stage != "train_baseline":
        spec["train"] = spec["train"].model_copy(update={"max_steps": max_steps})
    t = spec["train"]
    row_bytes = (t.max_bytes_per_row or t.seq_len * 8) if spec["mode"] == "patches" else t.seq_len
    if row_bytes > spec["model"].max_seqlen:
        raise TrainingConfigError(f"{stage}: rows of {row_bytes} bytes exceed the model's max_seqlen "
                                  f"{spec['model'].max_seqlen}")
    spec["seed"] = int(cfg.seed) + int(t.seed)
    return spec


# ----------------------------------------------------------------------------------------------- runtime setup
def local_world_size(train) -> int:
    env = os.environ.get("LOCAL_WORLD_SIZE")
    return int(env) if env else max(1, train.devices)


def set_threads(train) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    n = max(1, cores // local_world_size(train))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = min(n, max(1, int(os.environ["OMP_NUM_THREADS"])))
    import torch

    torch.set_num_threads(n)
    return n


def watch_parent() -> None:
    """If the launching process dies (even by SIGKILL), take this process group down with it."""
    expected = os.environ.get(PARENT_ENV)
    if not expected or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                try:
                    os.killpg(0, signal.SIGTERM)
                finally:
                    os._exit(143)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


def resolve_devices(train) -> dict[str, Any]:
    import torch

    accelerator = train.accelerator
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    precision = train.precision
    if precision == "auto":
        precision = "bf16-mixed" if on_gpu else "32-true"
    world = train.devices * train.num_nodes
    strategy: Any = train.strategy
    if strategy == "fsdp":
        if not on_gpu:
            raise TrainingConfigError("strategy=fsdp needs GPUs (Lightning refuses FSDP on CPU); use ddp")
        from lightning.pytorch.strategies import FSDPStrategy

        from blt_model.layers import CrossAttention, TransformerBlock

        strategy = FSDPStrategy(auto_wrap_policy={TransformerBlock, CrossAttention}, state_dict_type="full")
    elif strategy == "auto" and world > 1:
        strategy = "ddp"
    return {"accelerator": "gpu" if on_gpu else "cpu", "precision": precision, "strategy": strategy,
            "devices": train.devices, "num_nodes": train.num_nodes}


# ----------------------------------------------------------------------------------------------- main
def train(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from blt_pipeline.config import config_from_dict
    from training.artifacts import MODEL_FILE, save_model
    from training.callbacks import AtomicCheckpointIO, BytesThroughput, FailAfterSteps, MetricsLogger
    from training.datamodule import BltDataModule
    from training.modules import LMModule
    from training.wandb_utils import make_logger, setup_run

    cfg = config_from_dict(json.loads(Path(args.config).read_text()), args.config)
    spec = stage_spec(cfg, args.stage, args.seq_len, args.max_steps)
    t = spec["train"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = set_threads(t)
    dev = resolve_devices(t)
    L.seed_everything(spec["seed"], workers=True, verbose=False)

    module = LMModule(spec["kind"], spec["model"], t)
    dm = BltDataModule(mode=spec["mode"], ingest_dir=args.ingest, patch_dir=args.patch, train_cfg=t,
                       seed=spec["seed"])
    logger = make_logger(cfg, args.stage, args.key, out,
                         {"inputs": {"ingest": args.ingest, "patch": args.patch}, "kind": spec["kind"],
                          "model": json.loads(spec["model"].model_dump_json(by_alias=True)),
                          "train": json.loads(t.model_dump_json()), "threads_per_rank": threads})
    throughput = BytesThroughput(window_size=min(100, t.log_every_n_steps + 1))
    metrics = MetricsLogger(out / METRICS_FILE, t.log_every_n_steps, throughput)
    ckpt_dir = out / CKPT_DIR
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:08d}", every_n_train_steps=t.ckpt_every_n_steps,
                                 save_last=True, save_top_k=-1, auto_insert_metric_name=False)
    callbacks = [throughput, metrics, checkpoint]
    if (fail := FailAfterSteps.from_env()) is not None:
        callbacks.insert(0, fail)

    trainer = L.Trainer(
        **dev, max_steps=t.max_steps, max_epochs=-1, val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=t.val_batches, num_sanity_val_steps=0,
        gradient_clip_val=t.grad_clip, gradient_clip_algorithm="norm", log_every_n_steps=t.log_every_n_steps,
        logger=[logger] if logger is not None else False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out), plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
    )
    if trainer.is_global_zero and logger is not None:
        setup_run(logger, cfg, {"ingest": args.ingest, "patch": args.patch})
    last = ckpt_dir / "last.ckpt"
    resumed_from = str(last) if last.exists() else None
    if trainer.is_global_zero:
        print(f"[{args.stage}] {spec['kind']} model, {dev['accelerator']} x{t.devices * t.num_nodes} "
              f"({dev['strategy']}, {dev['precision']}), {threads} threads/rank, "
              + (f"resuming from {last}" if resumed_from else "fresh start"), flush=True)
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resumed_from)
    seconds = time.perf_counter() - started

    # the final weights: under FSDP go through a full-state checkpoint, else the module's own state dict
    if t.strategy == "fsdp":
        trainer.save_checkpoint(last)
        if trainer.is_global_zero:
            import torch

            sd = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
            state = {k.removeprefix("model.").removeprefix("_orig_mod."): v for k, v in sd.items()
                     if k.startswith("model.")}
        else:
            state = None
    else:
        state = module.plain_model().state_dict() if trainer.is_global_zero else None
    result: dict[str, Any] = {}
    if trainer.is_global_zero:
        save_model(out / MODEL_FILE, state, spec["kind"], spec["model"])
        last_row = metrics.last
        trained_bytes = int(module.bytes_seen) - metrics.start_bytes
        fit_s = metrics.fit_seconds or seconds
        summary = {
            "val_bpb": _last_value(out / METRICS_FILE, "val/bpb"),
            "train_loss": _last_value(out / METRICS_FILE, "train/loss"),
            "steps": int(trainer.global_step),
            "bytes_seen": int(module.bytes_seen),
            "bytes_per_s": round(trained_bytes / fit_s, 1) if fit_s > 0 and trained_bytes else None,
            "seconds": round(seconds, 3),
            "resumed_from_step": metrics.start_step if resumed_from else None,
        }
        wandb_info = None
        if logger is not None:
            exp = logger.experiment
            wandb_info = {"id": getattr(exp, "id", None), "group": cfg.wandb.group or cfg.name,
                          "job_type": args.stage, "dir": getattr(exp, "dir", None),
                          "url": getattr(exp, "url", None)}
        result = {"stage": args.stage, "kind": spec["kind"], "summary": summary, "model": MODEL_FILE,
                  "metrics": METRICS_FILE, "checkpoints": CKPT_DIR, "wandb": wandb_info,
                  "devices": {k: str(v) for k, v in dev.items()}, "threads_per_rank": threads,
                  "last_metrics": {k: v for k, v in last_row.items() if isinstance(v, (int, float))}}
        if logger is not None:
            logger.experiment.summary.update({k: v for k, v in summary.items() if v is not None})
            logger.finalize("success")
            import wandb

            wandb.finish()
        from blt_pipeline.stage import atomic_write_json

        atomic_write_json(out / RESULT_FILE, result)
    return result


def _last_value(path: Path, name: str) -> float | None:
    value = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if name in row:
                value = row[name]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=["train_entropy", "train_blt", "train_baseline"])
    p.add_argument("--config", required=True, help="resolved PipelineConfig as JSON")
    p.add_argument("--out", required=True, help="stage directory")
    p.add_argument("--key", required=True, help="stage key (W&B run id)")
    p.add_argument("--ingest", required=True, help="ingest stage directory (doc shards)")
    p.add_argument("--patch", default=None, help="patch stage directory (train_blt)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="train_baseline: bytes per row")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    watch_parent()
    try:
        train(args)
    except TrainingConfigError as err:
        print(f"training configuration error: {err}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT
    except BaseException:
        _finish_wandb(exit_code=1)  # close the run now, so a rerun can resume the same run id at once
        raise
    return 0


def _finish_wandb(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001 - never mask the training error
            print(f"warning: could not close the W&B run: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
