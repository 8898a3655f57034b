"""Pure-torch BLT: entropy/byte LM, Byte Latent Transformer, masks, hashing, FLOPs, HF conversion.

``blt_model.convert`` needs ``transformers`` (imported lazily); nothing here does I/O or logging.
Names are resolved lazily so that ``blt_model.config`` (pydantic only) loads without importing torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "BltConfig": "config", "EntropyModelConfig": "config", "TransformerShape": "config",
    "ByteLM": "entropy_model", "ByteLMCache": "entropy_model", "EntropyModel": "entropy_model",
    "entropy": "entropy_model", "blt_flops_per_byte": "flops", "bytelm_flops_per_byte": "flops",
    "decoder_patch_ids": "masks", "normalize_patch_lengths": "masks", "patch_ids_from_lengths": "masks",
    "BLT": "model", "patch_ids": "model",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
