"""The LightningDataModule: doc (+ patch) shards -> packed batches, with an exact, checkpointed position.

Every rank and every DataLoader worker runs the same deterministic packer over the whole stream and keeps
its own share: a *global* batch is ``batch_size * world_size`` rows, rank r takes rows
``[r*batch_size, (r+1)*batch_size)``, and with ``num_workers = w > 0`` worker i yields the global batches
``i, i+w, ...`` (the DataLoader interleaves workers in order, so the sequence is unchanged). Packing is cheap
next to the model (numpy over memory-mapped shards), so the duplicated packing costs little, and the
position is then one small dict that is identical on every rank.

Each batch carries ``batch["state"]``: the packer state *after* that global batch. The LightningModule keeps
the state of the last batch it trained on; ``BltDataModule.state_dict`` saves it into the checkpoint and
``load_state_dict`` makes the next ``train_dataloader`` start from it, so a resumed run sees exactly the
batches an uninterrupted run would have seen (independent of Lightning's prefetching and of workers).
Validation always restarts at the beginning of the val split, in file order, for ``val_batches`` batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.packing import BytePacker, DocSource, PatchPacker, byte_batch, patch_batch


class PackedBatches(IterableDataset):
    """Yields ready-made batches (dicts of tensors plus ``state``) for one rank; use ``batch_size=None``."""

    def __init__(self, *, mode: str, ingest_dir: str, split: str, seq_len: int, batch_size: int,
                 patch_dir: str | None = None, max_bytes: int | None = None, world_size: int = 1,
                 rank: int = 0, loop: bool = True, shuffle: bool = True, seed: int = 0,
                 state: dict | None = None, max_batches: int | None = None, pad_multiple: int = 64):
        if mode not in ("bytes", "patches"):
            raise ValueError(f"mode must be 'bytes' or 'patches', got {mode!r}")
        if mode == "patches" and (patch_dir is None or max_bytes is None):
            raise ValueError("mode='patches' needs patch_dir and max_bytes")
        self.mode, self.ingest_dir, self.split, self.patch_dir = mode, ingest_dir, split, patch_dir
        self.seq_len, self.batch_size, self.max_bytes = seq_len, batch_size, max_bytes
        self.world_size, self.rank = world_size, rank
        self.loop, self.shuffle, self.seed = loop, shuffle, seed
        self.state, self.max_batches, self.pad_multiple = state, max_batches, pad_multiple

    def _packer(self):
        source = DocSource(self.ingest_dir, self.split, self.patch_dir if self.mode == "patches" else None,
                           shuffle=self.shuffle, seed=self.seed)
        if self.mode == "bytes":
            return BytePacker(source, self.seq_len, loop=self.loop, state=self.state)
        return PatchPacker(source, self.seq_len, self.max_bytes, loop=self.loop, state=self.state)

    def _collate(self, rows: list) -> dict[str, Any]:
        if self.mode == "bytes":
            arrays = byte_batch(rows, self.seq_len)
        else:
            arrays = patch_batch(rows, self.seq_len, self.max_bytes, self.pad_multiple)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        packer = self._packer()
        global_rows = self.batch_size * self.world_size
        index = 0
        while self.max_batches is None or index < self.max_batches:
            rows = []
            for _ in range(global_rows):
                row = packer.next_row()
                if row is None:
                    break
                rows.append(row)
            if not rows:
                return
            real = len(rows)
            global_bytes = sum(int((r if self.mode == "bytes" else r[0]).size) - 1 for r in rows)
            rows += [rows[-1]] * (global_rows - real)  # a final partial batch: repeat, masked out below
            state = packer.state.to_dict()
            if index % n_workers == worker:
                mine = rows[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
                batch = self._collate(mine)
                first = self.rank * self.batch_size
                for i in range(len(mine)):
                    if first + i >= real:
                        batch["mask"][i] = False
                batch["state"] = state
                batch["global_bytes"] = global_bytes
                yield batch
            index += 1


class BltDataModule(L.LightningDataModule):
    """Train/val dataloaders over packed rows; ``mode`` 'bytes' (ByteLM) or 'patches' (BLT)."""

    def __init__(self, *, mode: str, ingest_dir: str | Path, train_cfg, patch_dir: str | Path | None = None,
                 seed: int = 0):
        super().__init__()
        self.mode = mode
        self.ingest_dir = str(ingest_dir)
        self.patch_dir = str(patch_dir) if patch_dir is not None else None
        self.cfg = train_cfg
        self.seed = seed
        self.resume_state: dict | None = None

    @property
    def max_bytes(self) -> int | None:
        if self.mode != "patches":
            return None
        return self.cfg.max_bytes_per_row or self.cfg.seq_len * 8

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _dataset(self, split: str, **kw) -> PackedBatches:
        world, rank = self._world()
        return PackedBatches(mode=self.mode, ingest_dir=self.ingest_dir, patch_dir=self.patch_dir, split=split,
                             seq_len=self.cfg.seq_len, batch_size=self.cfg.batch_size, max_bytes=self.max_bytes,
                             world_size=world, rank=rank, seed=self.seed, **kw)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train", loop=True, shuffle=True, state=self.resume_state)
        return DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        ds = self._dataset("val", loop=False, shuffle=False, max_batches=self.cfg.val_batches)
        return DataLoader(ds, batch_size=None, num_workers=0)

    # the data position travels in the checkpoint --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        state = getattr(module, "data_state", None)
        return {"train_state": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_state = state_dict.get("train_state")


def batch_bytes(batch: dict) -> int:
    """Target bytes in a batch (the real, unpadded positions)."""
    return int(batch["mask"].sum())


__all__ = ["BltDataModule", "PackedBatches", "batch_bytes"]
