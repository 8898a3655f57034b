"""LightningModules: thin wrappers that train ``blt_model`` networks (the nn.Modules stay Lightning-free).

``LMModule(kind, model_config, train_cfg)`` trains a ``ByteLM`` (kind "entropy"/"baseline", batches from
byte rows) or a ``BLT`` (kind "blt", batches with ``patch_lengths``). Loss: next-byte cross-entropy summed
over real target bytes (``mask``) / their count; BPB = CE_sum / ln 2 / n_target_bytes. AdamW (betas and
weight decay from the config, no parameter groups, as the official code), linear warmup then cosine to
``min_lr_ratio * lr``; gradient clipping is the Trainer's (``gradient_clip_val``).

State beyond weights/optimizer kept in checkpoints: ``bytes_seen`` (global target bytes trained on) and
``data_state`` (the packer position after the last trained batch, see ``training.datamodule``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from training.artifacts import build_model, config_to_dict

LN2 = math.log(2.0)


def lr_lambda(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warmup, cosine to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LMModule(L.LightningModule):
    def __init__(self, kind: str, model_config: Any, train_cfg: Any):
        super().__init__()
        self.kind = kind
        self.model_config = model_config
        self.train_cfg = train_cfg
        self.save_hyperparameters({"kind": kind, "model": config_to_dict(model_config),
                                   "train": config_to_dict(train_cfg)})
        # built eagerly (cheap at our sizes); FSDP wraps the built modules, configure_model only compiles
        self.model: torch.nn.Module | None = build_model(kind, model_config)
        self.bytes_seen = 0  # global target bytes trained on (same value on every rank)
        self.data_state: dict | None = None
        self.flops_per_batch = 0  # read by ThroughputMonitor after each batch (per device)
        self._train_acc = torch.zeros(2, dtype=torch.float64)  # (CE sum nats, target bytes) since last log
        self._val_acc = torch.zeros(2, dtype=torch.float64)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_model(self.kind, self.model_config)
        if getattr(self.train_cfg, "compile", False) and not hasattr(self.model, "_orig_mod"):
            self.model = torch.compile(self.model)

    # ------------------------------------------------------------------------------------------ forward/loss
    def forward(self, batch: dict) -> torch.Tensor:
        if self.kind == "blt":
            return self.model(batch["x"], batch["patch_lengths"])
        return self.model(batch["x"])

    def _ce(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE sum in nats over real targets, number of real targets)."""
        logits = self(batch)
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten(), reduction="none")
        mask = batch["mask"].flatten()
        return (ce * mask).sum(), mask.sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ce_sum, n = self._ce(batch)
        loss = ce_sum / n.clamp_min(1)
        self.data_state = batch.get("state")
        self.bytes_seen += int(batch.get("global_bytes", int(n)))
        self.flops_per_batch = self.batch_flops(batch, int(n))
        self._train_acc += torch.stack([ce_sum.detach().double().cpu(), n.detach().double().cpu()])
        return loss

    def batch_flops(self, batch: dict, n_bytes: int) -> int:
        """Training FLOPs (fwd + bwd) of this device's batch, from ``blt_model.flops`` (analytic)."""
        from blt_model.flops import blt_flops_per_byte, bytelm_flops_per_byte

        width = int(batch["x"].shape[1])
        if self.kind == "blt":
            n_patches = max(1, int((batch["patch_lengths"] > 0).sum()))
            bpp = max(1.0, n_bytes / n_patches)
            per_byte = blt_flops_per_byte(self.model_config, bpp, width)["total_train"]
        else:
            per_byte = bytelm_flops_per_byte(self.model_config, width)["total_train"]
        return int(per_byte * n_bytes)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ce_sum, n = self._ce(batch)
        self._val_acc += torch.stack([ce_sum.detach().double().cpu(), n.detach().double().cpu()])

    def take_train_acc(self) -> torch.Tensor:
        acc, self._train_acc = self._train_acc, torch.zeros(2, dtype=torch.float64)
        return acc

    def take_val_acc(self) -> torch.Tensor:
        acc, self._val_acc = self._val_acc, torch.zeros(2, dtype=torch.float64)
        return acc

    # ------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        c = self.train_cfg
        fused = self.device.type in ("cuda", "cpu")  # fused AdamW: ~4x faster than the for-loop one on CPU
        opt = torch.optim.AdamW(self.parameters(), lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8,
                                weight_decay=c.weight_decay, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, c.max_steps, c.warmup_steps, c.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["blt_bytes_seen"] = self.bytes_seen
        checkpoint["blt_data_state"] = self.data_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.bytes_seen = int(checkpoint.get("blt_bytes_seen", 0))
        self.data_state = checkpoint.get("blt_data_state")

    def plain_model(self) -> torch.nn.Module:
        return getattr(self.model, "_orig_mod", self.model)


__all__ = ["LMModule", "lr_lambda", "LN2"]
