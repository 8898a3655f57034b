"""Lightning callbacks and plugins of the training entry point.

- ``BytesThroughput``: Lightning's ``ThroughputMonitor`` counting **bytes** (``length_fn`` = real target bytes
  of a batch) and FLOPs (``LMModule.flops_per_batch``); on CPU, where Lightning knows no peak, the peak is
  ``BLT_PEAK_FLOPS`` (per device) or a matmul measured once. Its numbers are handed to ``MetricsLogger``
  rather than logged under Lightning's names.
- ``MetricsLogger``: every ``log_every_n_steps`` reduces the loss sums over ranks and writes ``train/loss``,
  ``train/bpb``, ``train/lr``, ``perf/bytes_per_s``, ``perf/mfu``, ... with ``train/bytes_seen`` to
  ``metrics.jsonl`` (rank 0) and to the Lightning loggers (W&B); ``val/bpb`` after each validation and a final
  validation at the last step if the schedule did not land on it.
- ``FailAfterSteps``: test hook, ``BLT_FAIL_AFTER_STEPS=N`` raises once N steps are done (only in a run that
  started below N, so the resumed run continues).
- ``AtomicCheckpointIO``: checkpoints are written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO

from blt_pipeline.stage import atomic_path
from training.modules import LN2

FAIL_ENV = "BLT_FAIL_AFTER_STEPS"
PEAK_ENV = "BLT_PEAK_FLOPS"


class InjectedFailure(RuntimeError):
    """Raised by ``FailAfterSteps`` (tests of resume)."""


# ----------------------------------------------------------------------------------------------- peak FLOPs
def measure_cpu_peak_flops(n: int = 1024, seconds: float = 0.4) -> float:
    """fp32 matmul FLOP/s with the current torch thread count (a cheap, honest CPU 'peak')."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    reps, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or reps >= 50:
            return 2.0 * n**3 * reps / elapsed


def peak_flops_from_env() -> float | None:
    raw = os.environ.get(PEAK_ENV)
    return float(raw) if raw else None


class BytesThroughput(ThroughputMonitor):
    """ThroughputMonitor over bytes; keeps the latest metrics in ``self.latest`` (rank 0)."""

    def __init__(self, window_size: int = 11):
        super().__init__(batch_size_fn=lambda b: int(b["x"].shape[0]),
                         length_fn=lambda b: max(int(b["mask"].sum()), int(b["x"].shape[0])),
                         window_size=window_size)
        self.latest: dict[str, float] = {}
        self._val_started: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None and trainer.strategy.root_device.type == "cpu":
            peak = peak_flops_from_env() or measure_cpu_peak_flops()
            self.available_flops = peak
            for t in self._throughputs.values():
                t.available_flops = peak

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        stage = trainer.state.stage
        if stage is not None and stage in self._throughputs and stage.value == "train":
            self.latest = dict(self._throughputs[stage].compute())

    # validation is not measured; its wall time is removed from the training clock
    def on_validation_start(self, trainer, *_: Any) -> None:
        self._val_started = time.perf_counter()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_end(self, trainer, *_: Any) -> None:
        if self._val_started is not None and not trainer.sanity_checking:
            for stage in list(self._t0s):
                if stage.value == "train":
                    self._t0s[stage] += time.perf_counter() - self._val_started
        self._val_started = None

    def perf_metrics(self, world_size: int) -> dict[str, float]:
        m = self.latest
        out: dict[str, float] = {}
        dev_bytes = m.get("device/items_per_sec")
        if dev_bytes is not None:
            out["perf/bytes_per_s"] = float(dev_bytes) * world_size
            out["perf/bytes_per_s_per_device"] = float(dev_bytes)
        if "device/flops_per_sec" in m:
            out["perf/flops_per_s_per_device"] = float(m["device/flops_per_sec"])
        if "device/mfu" in m:
            out["perf/mfu"] = float(m["device/mfu"])
        return out


# ----------------------------------------------------------------------------------------------- metrics
class MetricsLogger(Callback):
    """Writes the run's metrics (see module docstring); keeps ``last`` values for the stage summary."""

    def __init__(self, path: str | Path, log_every_n_steps: int, throughput: BytesThroughput | None = None,
                 echo: bool = True):
        self.path = Path(path)
        self.every = log_every_n_steps
        self.throughput = throughput
        self.echo = echo
        self.last: dict[str, Any] = {}
        self.last_val_step: int | None = None
        self.start_step = 0
        self.start_bytes = 0
        self.fit_started: float | None = None
        self.fit_seconds = 0.0

    # rows -------------------------------------------------------------------------------------------------
    def _emit(self, trainer: L.Trainer, module, metrics: dict[str, float]) -> None:
        step = int(trainer.global_step)
        metrics = {"train/bytes_seen": int(module.bytes_seen), **metrics}
        self.last.update(metrics)
        self.last["step"] = step
        if not trainer.is_global_zero:
            return
        row = {"step": step, "bytes_seen": int(module.bytes_seen), **metrics, "time": round(time.time(), 3)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        if self.echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            print(f"[{module.kind}] step {step}/{trainer.max_steps} {shown}", flush=True)

    def _reduce(self, trainer: L.Trainer, module, acc: torch.Tensor) -> tuple[float, float]:
        acc = trainer.strategy.reduce(acc.to(module.device), reduce_op="sum")
        return float(acc[0]), float(acc[1])

    # hooks ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.start_step = int(trainer.global_step)
        self.start_bytes = int(pl_module.bytes_seen)
        self.fit_started = time.perf_counter()
        if trainer.is_global_zero and self.path.exists():
            # a resumed run: drop rows logged after the checkpoint it resumes from (they will be redone)
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= self.start_step:
                        keep.append(line)
                except (ValueError, AttributeError):
                    continue
            from blt_pipeline.stage import atomic_write_text

            atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step % self.every and step != trainer.max_steps:
            return
        ce, n = self._reduce(trainer, pl_module, pl_module.take_train_acc())
        loss = ce / max(n, 1.0)
        metrics = {"train/loss": loss, "train/bpb": loss / LN2}
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None:
            metrics["train/lr"] = float(opt.param_groups[0]["lr"])
        if self.throughput is not None:
            metrics.update(self.throughput.perf_metrics(trainer.world_size))
        self._emit(trainer, pl_module, metrics)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        pl_module.take_val_acc()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        ce, n = self._reduce(trainer, pl_module, pl_module.take_val_acc())
        if n <= 0:
            return
        self.last_val_step = int(trainer.global_step)
        self._emit(trainer, pl_module, {"val/bpb": ce / n / LN2, "val/loss": ce / n, "val/bytes": n})

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.fit_started is not None:
            self.fit_seconds = time.perf_counter() - self.fit_started
        if self.last_val_step != trainer.global_step:
            self.final_validation(trainer, pl_module)

    @torch.no_grad()
    def final_validation(self, trainer: L.Trainer, pl_module) -> None:
        """Score the val batches once more at the final step (same batches and reduction as validation)."""
        dm = trainer.datamodule
        if dm is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        pl_module.take_val_acc()
        with trainer.precision_plugin.forward_context():
            for batch in dm.val_dataloader():
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                pl_module.validation_step(batch, 0)
        pl_module.train(was_training)
        self.on_validation_epoch_end(trainer, pl_module)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------- test hook
class FailAfterSteps(Callback):
    """Raise ``InjectedFailure`` at the start of step N+1 (after step N's checkpoint was written)."""

    def __init__(self, n: int):
        self.n = n
        self.start_step = 0

    @classmethod
    def from_env(cls) -> FailAfterSteps | None:
        raw = os.environ.get(FAIL_ENV)
        return cls(int(raw)) if raw else None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = int(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start_step < self.n <= trainer.global_step:
            raise InjectedFailure(f"{FAIL_ENV}={self.n}: injected failure after {trainer.global_step} steps")


# ----------------------------------------------------------------------------------------------- checkpoint io
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file and renames: a checkpoint is whole or absent."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


__all__ = ["AtomicCheckpointIO", "BytesThroughput", "FAIL_ENV", "FailAfterSteps", "InjectedFailure",
           "MetricsLogger", "PEAK_ENV", "measure_cpu_peak_flops"]
