"""Mask builder and patch-id helpers (BLT_REFERENCE §1.7, §1.9)."""

from __future__ import annotations

import pytest
import torch

from blt_model.masks import (
    attention_mask,
    decoder_patch_ids,
    document_ids,
    normalize_patch_lengths,
    patch_document_ids,
    patch_ids_from_lengths,
    patch_mask,
    sequence_mask,
)
from blt_model.model import patch_ids


def test_reference_patch_id_example():
    lengths = torch.tensor([[1, 3, 2, 4, 1]])  # sums to N+1 = 11
    assert patch_ids_from_lengths(lengths, 10).tolist() == [[0, 1, 1, 1, 2, 2, 3, 3, 3, 3]]
    assert decoder_patch_ids(lengths, 10).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3]]


def test_matches_transformers_patch_ids():
    from transformers.models.blt.modeling_blt import BltModel

    lengths = torch.tensor([[1, 3, 2, 4, 2, 0, 0], [1, 1, 5, 1, 1, 1, 3]])
    hf = BltModel._patch_ids_from_lengths(None, lengths, 12)
    assert torch.equal(patch_ids_from_lengths(lengths, 12), hf)
    norm = normalize_patch_lengths(lengths, 12)
    ours = decoder_patch_ids(norm, 12)
    theirs = BltModel._patch_ids_from_lengths(None, lengths[:, 1:], 12)
    assert torch.equal(ours[1], theirs[1])  # no padding: identical
    # padded row: identical except the last byte, which transformers sends to the zero-length trailing patch
    # (we treat trailing zeros as padding; documented in blt_model.model)
    assert torch.equal(ours[0, :-1], theirs[0, :-1]) and ours[0, -1] == 3 and theirs[0, -1] == 5


def test_normalize_conventions_and_padding():
    L = 10
    hf = torch.tensor([[1, 3, 2, 4, 0, 0], [1, 2, 2, 2, 2, 1]])  # sum L, trailing zeros = padding
    out = normalize_patch_lengths(hf, L)
    assert out.tolist() == [[1, 3, 2, 5, 0, 0], [1, 2, 2, 2, 2, 2]]
    official = torch.tensor([[1, 3, 2, 4, 1]])  # sum L+1 unchanged
    assert torch.equal(normalize_patch_lengths(official, L), official)
    enc, dec, _ = patch_ids(hf, L)
    assert dec[0, -1].item() == 2 and dec[1, -1].item() == 4  # last byte reads the previous patch
    _, dec1, _ = patch_ids(official, L)
    assert dec1[0, -1].item() == 3  # next-byte slot alone -> last byte reads its own patch
    with pytest.raises(ValueError):
        normalize_patch_lengths(torch.tensor([[2, 3, 5]]), L)  # first patch must be 1
    with pytest.raises(ValueError):
        normalize_patch_lengths(torch.tensor([[1, 3, 3]]), L)  # wrong sum


def test_attention_mask_window_and_docs():
    ids = torch.tensor([[1, 5, 2, 1, 6, 7, 2, 1]])
    doc = document_ids(ids)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]  # EOS belongs to the document it closes
    pos = torch.arange(8)
    m = attention_mask(pos, pos, window=3, q_doc=doc, k_doc=doc)[0, 0]
    for q in range(8):
        for k in range(8):
            expect = k <= q and q - k < 3 and doc[0, q] == doc[0, k]
            assert bool(m[q, k]) == bool(expect), (q, k)
    assert sequence_mask(torch.tensor([[1, 5, 6, 2]]), window=8) is None  # EOS at the end splits nothing
    assert sequence_mask(ids, window=None).shape == (1, 1, 8, 8)
    # streaming offsets: chunk 2 continues docs
    assert document_ids(ids[:, 4:], offset=torch.tensor([1])).tolist() == [[1, 1, 1, 2]]


def test_patch_docs_block_causal():
    ids = torch.tensor([[1, 5, 6, 2, 1, 7, 8, 9, 2, 1]])
    lengths = torch.tensor([[1, 3, 1, 4, 1, 1]])  # patches: [1] [5 6 2] [1] [7 8 9 2] [1] [next]
    enc = patch_ids_from_lengths(lengths, 10)
    assert patch_document_ids(ids, enc, 6).tolist() == [[0, 0, 1, 1, 2, 2]]
    m = patch_mask(ids, enc, 6)[0, 0]
    assert m[2].tolist() == [False, False, True, False, False, False]
    assert m[3].tolist() == [False, False, True, True, False, False]
    assert m[5].tolist() == [False, False, False, False, True, True]
