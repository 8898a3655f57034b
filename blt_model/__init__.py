"""Pure-torch BLT: entropy/byte LM, Byte Latent Transformer, masks, hashing, FLOPs, HF conversion.

``blt_model.convert`` needs ``transformers`` (imported lazily); nothing here does I/O or logging.
"""

from .config import BltConfig, EntropyModelConfig, TransformerShape
from .entropy_model import ByteLM, ByteLMCache, EntropyModel, entropy
from .flops import blt_flops_per_byte, bytelm_flops_per_byte
from .masks import decoder_patch_ids, normalize_patch_lengths, patch_ids_from_lengths
from .model import BLT, patch_ids

__all__ = [
    "BltConfig", "EntropyModelConfig", "TransformerShape", "ByteLM", "ByteLMCache", "EntropyModel", "entropy",
    "BLT", "patch_ids", "patch_ids_from_lengths", "decoder_patch_ids", "normalize_patch_lengths",
    "blt_flops_per_byte", "bytelm_flops_per_byte",
]
