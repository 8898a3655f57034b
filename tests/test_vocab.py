"""Byte vocabulary: id = byte + 4, specials below 4, lossless for arbitrary bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blt_model import vocab
from blt_model.vocab import BOS_ID, EOS_ID, OFFSET, VOCAB_SIZE, decode, encode, encode_array, encode_tensor


def test_constants():
    assert (vocab.BOE_ID, vocab.PAD_ID, BOS_ID, EOS_ID, vocab.BPE_ID, OFFSET, VOCAB_SIZE) == (0, 0, 1, 2, 3, 4, 260)


def test_all_256_bytes_roundtrip():
    data = bytes(range(256))
    ids = encode(data)
    assert ids == [BOS_ID] + list(range(4, 260)) + [EOS_ID]
    assert decode(ids) == data
    assert decode(encode_tensor(data)) == data
    assert decode(encode_array(data)) == data


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"a\x00b\x00", b"\xff\xfe\xfd", b"\xc3\x28", b"\xe2\x82", "héllo ✓".encode(), b"\x80" * 5],
)
def test_roundtrip_invalid_utf8_and_nul(data):
    for bos in (False, True):
        for eos in (False, True):
            ids = encode(data, bos=bos, eos=eos)
            assert len(ids) == vocab.num_tokens(len(data), bos, eos)
            assert decode(ids) == data
            if bos:
                assert ids[0] == BOS_ID
            if eos:
                assert ids[-1] == EOS_ID


def test_flags_and_types():
    assert encode(b"ab", bos=False, eos=False) == [ord("a") + 4, ord("b") + 4]
    assert encode(b"ab", bos=True, eos=False) == [1, ord("a") + 4, ord("b") + 4]
    t = encode_tensor(b"ab")
    assert t.dtype == torch.long and t.tolist() == [1, 101, 102, 2]
    assert encode(bytearray(b"x")) == encode(memoryview(b"x")) == encode(b"x")
    assert encode("é") == encode("é".encode())
    with pytest.raises(TypeError):
        encode(123)  # type: ignore[arg-type]


def test_decode_drops_specials_and_rejects_out_of_vocab():
    assert decode([0, 1, 4 + 65, 3, 2, 0]) == b"A"
    assert decode(np.array([1, 2], dtype=np.int32)) == b""
    assert decode(torch.tensor([[1, 72 + 4], [105 + 4, 2]])) == b"Hi"
    with pytest.raises(ValueError):
        decode([260])
    with pytest.raises(ValueError):
        decode([-1])
