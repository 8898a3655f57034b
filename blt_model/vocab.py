"""Byte vocabulary of the reference BLT: ``id = byte + 4`` with four special ids below.

=====  =====  ===================================================================
id     name   meaning
=====  =====  ===================================================================
0      BOE    pad / beginning-of-example filler (also the padding id of packed rows)
1      BOS    beginning of a document
2      EOS    end of a document
3      BPE    BPE delimiter (only for the reference's ``bpe`` patching mode; unused here)
4-259  bytes  the raw byte ``id - 4``
=====  =====  ===================================================================

Encoding is lossless for arbitrary bytes: no UTF-8 (or any other) decoding happens anywhere. ``decode``
drops every special id (< 4), so ``decode(encode(b)) == b`` for every ``bytes`` value ``b``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

BOE_ID = 0
PAD_ID = BOE_ID
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET  # 260

BytesLike = bytes | bytearray | memoryview | str
IdsLike = Iterable[int] | np.ndarray | torch.Tensor

__all__ = [
    "BOE_ID", "PAD_ID", "BOS_ID", "EOS_ID", "BPE_ID", "OFFSET", "VOCAB_SIZE",
    "encode", "encode_array", "encode_tensor", "decode", "num_tokens",
]


def _as_bytes(data: BytesLike) -> bytes | memoryview:
    if isinstance(data, str):  # convenience for prompts; documents are always bytes
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    raise TypeError(f"encode expects bytes (or str), got {type(data).__name__}")


def encode_array(data: BytesLike, bos: bool = True, eos: bool = True, dtype=np.int64) -> np.ndarray:
    """``[BOS] + [b + 4 for b in data] + [EOS]`` as a 1-D numpy array (vectorised, no Python loop)."""
    raw = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    out = np.empty(raw.size + int(bos) + int(eos), dtype=dtype)
    start = int(bos)
    if bos:
        out[0] = BOS_ID
    np.add(raw, OFFSET, out=out[start:start + raw.size], dtype=dtype, casting="unsafe")
    if eos:
        out[-1] = EOS_ID
    return out


def encode(data: BytesLike, bos: bool = True, eos: bool = True) -> list[int]:
    """Token ids of one document as a Python list (see ``encode_tensor`` for a LongTensor)."""
    return encode_array(data, bos, eos).tolist()


def encode_tensor(data: BytesLike, bos: bool = True, eos: bool = True) -> torch.Tensor:
    """Token ids of one document as a 1-D ``torch.long`` tensor."""
    return torch.from_numpy(encode_array(data, bos, eos))


def num_tokens(num_bytes: int, bos: bool = True, eos: bool = True) -> int:
    """``len(encode(data))`` for ``len(data) == num_bytes``."""
    return num_bytes + int(bos) + int(eos)


def decode(ids: IdsLike) -> bytes:
    """Bytes of ``ids``; special ids (< 4: BOE/pad, BOS, EOS, BPE) are dropped. Ids >= 260 raise."""
    if isinstance(ids, torch.Tensor):
        arr = ids.detach().cpu().reshape(-1).numpy()
    else:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids)).reshape(-1)
    if arr.size == 0:
        return b""
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"decode expects integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.max() >= VOCAB_SIZE or arr.min() < 0:
        bad = arr[(arr >= VOCAB_SIZE) | (arr < 0)][0]
        raise ValueError(f"id {int(bad)} is outside the byte vocabulary [0, {VOCAB_SIZE})")
    return (arr[arr >= OFFSET] - OFFSET).astype(np.uint8).tobytes()
