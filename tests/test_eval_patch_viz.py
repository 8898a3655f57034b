"""Patch pictures: one HTML segment per patch, and the segments give back the input bytes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blt_model.patching import Patcher
from evaluation.patch_viz import parse_html_segments, picture, segments, token_entropies, write_pictures


class _StubLM(torch.nn.Module):
    """Deterministic 'entropy model': logits depend on the token, so entropies vary byte to byte."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(260, 260, generator=g) * 3)
        self.cfg = type("Cfg", (), {"window": 4, "max_seqlen": 64})()

    def forward(self, ids):
        return self.table[ids]


TEXT = "héllo wörld, def f(x):\n\treturn x + 1  # ok\n".encode() + b"\xff\xfe bad \xe2\x82 cut"


def test_segments_roundtrip_html_and_png(tmp_path):
    model = _StubLM()
    tokens = np.concatenate(([1], np.frombuffer(TEXT, np.uint8) + 4))
    h = token_entropies(model, tokens)
    theta = float(np.median(h))
    pic = picture(model, Patcher(mode="entropy", threshold=theta), TEXT, caption="t<1>")
    segs = pic.segments
    assert b"".join(segs) == TEXT
    assert 1 < len(segs) < len(TEXT)  # multi-byte patches and several of them
    assert len(segs) == len(pic.patch_lengths) - 1
    files = write_pictures([pic, pic], tmp_path / "p")
    text = files["html"].read_text(encoding="utf-8")
    parsed = parse_html_segments(text)
    assert parsed == [segs, segs]
    assert "\\xff" in text and "t&lt;1&gt;" in text
    assert files["png"].read_bytes()[:4] == b"\x89PNG" and files["png1"].exists()


def test_entropies_are_chunk_invariant():
    model = _StubLM()
    tokens = np.concatenate(([1], np.frombuffer(TEXT, np.uint8) + 4))
    full = token_entropies(model, tokens)
    chunked = token_entropies(model, tokens, chunk_len=7)
    np.testing.assert_allclose(full, chunked, rtol=1e-5)


def test_segments_rejects_bad_lengths():
    assert segments(b"abc", [1, 2, 1]) == [b"ab", b"c"]
    assert segments(b"abc", [1, 3, 1]) == [b"abc"]  # a trailing EOS / next-byte slot is dropped
    with pytest.raises(ValueError):
        segments(b"abc", [2, 2])
