"""Patchers: hand-made cases per mode, reference/transformers parity, incrementality, splitting, calibration."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_model.patching import (
    Patcher,
    bytes_per_patch,
    calibrate_threshold,
    entropy_patch_lengths,
    pad_patch_lengths,
    patch_starts,
    space_patch_lengths,
    split_long_patches,
    static_patch_lengths,
)
from blt_model.vocab import BOS_ID, encode
from blt_pipeline.config import PatchConfig

H = [5.0, 1.0, 2.0, 0.5, 3.0, 0.2, 0.1, 4.0]  # N = 8 tokens


def L(x) -> list[int]:
    return np.asarray(x).tolist()


# ------------------------------------------------------------------------------------------ hand-made cases
def test_global_threshold():
    # starts: 0, 1 always; t>=2 iff H[t-1] > 1.5 -> t=3 (H2=2), t=5 (H4=3); t=8 (H7=4) only with next token
    assert L(entropy_patch_lengths(H, 1.5)) == [1, 2, 2, 3]
    assert L(entropy_patch_lengths(H, 1.5, include_next_token=True)) == [1, 2, 2, 3, 1]
    assert L(entropy_patch_lengths(H, 10.0)) == [1, 7]
    assert L(entropy_patch_lengths(H, 10.0, include_next_token=True)) == [1, 8]
    assert L(entropy_patch_lengths(H, -1.0)) == [1] * 8
    assert L(entropy_patch_lengths(H, 0.15)) == [1, 1, 1, 1, 1, 1, 2]  # H6=.1 < .15 -> token 7 joins patch of 6


def test_monotonic():
    # diffs H[t-1]-H[t-2] for t=2..7: -4, 1, -1.5, 2.5, -2.8, -0.1; t=8: 3.9
    assert L(entropy_patch_lengths(H, 0.5, monotonic=True)) == [1, 2, 2, 3]
    assert L(entropy_patch_lengths(H, 0.5, monotonic=True, include_next_token=True)) == [1, 2, 2, 3, 1]
    # the reference forces a start at position 2
    assert L(entropy_patch_lengths(H, 0.5, monotonic=True, reference_quirks=True)) == [1, 1, 1, 2, 3]
    assert L(entropy_patch_lengths(H, 2.0, monotonic=True)) == [1, 4, 3]


def test_global_plus_relative():
    h = [5.0, 1.0, 3.0, 0.5, 3.0, 3.5, 0.1, 4.0]
    # t: 2..7 -> (diff > 0.2 and H[t-1] > 2): t=3 (3-1, 3), t=5 (2.5, 3), t=6 (0.5, 3.5)
    assert L(entropy_patch_lengths(h, 2.0, threshold_add=0.2)) == [1, 2, 2, 1, 2]
    assert L(entropy_patch_lengths(h, 2.0, threshold_add=0.2, include_next_token=True)) == [1, 2, 2, 1, 2, 1]
    # reference quirks: 2 always starts, 3 never
    assert L(entropy_patch_lengths(h, 2.0, threshold_add=0.2, reference_quirks=True)) == [1, 1, 3, 1, 2]
    with pytest.raises(ValueError):
        entropy_patch_lengths(h, 2.0, threshold_add=0.2, monotonic=True)


def test_space():
    assert L(space_patch_lengths(encode(b"a,  b"))) == [1, 2, 4]  # [BOS][a,][  b EOS]
    assert L(space_patch_lengths(encode(b"a,  b"), include_next_token=True)) == [1, 2, 4, 1]  # EOS ends
    assert L(space_patch_lengths(encode(b"hello world foo"))) == [1, 6, 6, 4]  # [hello ][world ][foo EOS]
    # UTF-8 lead bytes (>= 0xC0) are space-like and end a patch, continuation bytes are not; as in the
    # reference, "é" (C3 A9) after a letter is split: [BOS][c a f C3][A9 ␣][s EOS]
    assert L(space_patch_lengths(encode("café s".encode()))) == [1, 4, 2, 2]
    assert L(space_patch_lengths(encode("a é".encode()))) == [1, 2, 3]  # [a␣][C3 A9 EOS]
    # a leading space joins the first word (BOS before it counts as space-like)
    assert L(space_patch_lengths(encode(b" ab"))) == [1, 4]
    assert L(space_patch_lengths([BOS_ID])) == [1]
    assert L(space_patch_lengths([BOS_ID], include_next_token=True)) == [1, 1]


def test_static_and_byte():
    assert L(static_patch_lengths(10, 4)) == [1, 4, 4, 1]
    assert L(static_patch_lengths(10, 4, include_next_token=True)) == [1, 4, 4, 2]
    assert L(static_patch_lengths(9, 4)) == [1, 4, 4]
    assert L(Patcher("byte").patch_lengths(tokens=[1, 5, 6, 2])) == [1, 1, 1, 1]
    assert L(Patcher("byte").patch_lengths(tokens=[1, 5, 6, 2], include_next_token=True)) == [1] * 5
    assert L(Patcher("static", static_size=3).patch_lengths(entropies=np.zeros(8))) == [1, 3, 3, 1]


def test_tiny_documents():
    for n in range(0, 3):
        h = np.ones(n)
        assert sum(entropy_patch_lengths(h, 0.0)) == n
        assert sum(entropy_patch_lengths(h, 0.0, include_next_token=True)) == n + 1
    assert L(entropy_patch_lengths([1.0], 0.0, include_next_token=True)) == [1, 1]
    assert L(entropy_patch_lengths([], 0.0, include_next_token=True)) == [1]


def test_max_patch_length():
    assert L(split_long_patches([1, 9, 2, 3], 3)) == [1, 3, 3, 3, 2, 3]
    assert L(split_long_patches([1, 7], 3)) == [1, 3, 3, 1]
    assert L(split_long_patches([1, 7], None)) == [1, 7]
    assert L(entropy_patch_lengths(H, 10.0, max_patch_length=3)) == [1, 3, 3, 1]
    assert L(entropy_patch_lengths(H, 10.0, max_patch_length=3, include_next_token=True)) == [1, 3, 3, 2]
    out = split_long_patches(np.random.default_rng(0).integers(1, 50, 1000), 7)
    assert out.max() <= 7 and out.dtype == np.int32


# ------------------------------------------------------------------------------------------ parity
def _reference_start_ids(entropies: torch.Tensor, threshold, threshold_add=None, monotonicity=False,
                         include_next_token=True) -> list[int]:
    """The official ``find_entropy_patch_start_ids`` logic (one row), restated for comparison."""
    e = entropies[1:]
    if monotonicity:
        m = torch.zeros_like(e, dtype=torch.bool)
        m[0] = True
        m[1:] = (e[1:] - e[:-1]) > threshold
    elif threshold_add is not None:
        m = torch.zeros_like(e, dtype=torch.bool)
        m[0] = True
        m[1:] = ((e[1:] - e[:-1]) > threshold_add) & (e[1:] > threshold) & (~m[:-1])
    else:
        m = e > threshold
    if not include_next_token:
        m = m[:-1]
    return [0, 1] + (torch.nonzero(m).flatten() + 2).tolist()


@pytest.mark.parametrize("rule", ["global", "monotonic", "relative"])
@pytest.mark.parametrize("include_next_token", [False, True])
def test_matches_reference_with_quirks(rule, include_next_token):
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(3, 60))
        h = rng.gamma(2.0, 1.0, n).astype(np.float32)
        kw = dict(monotonic=rule == "monotonic", threshold_add=0.3 if rule == "relative" else None)
        thr = 0.2 if rule == "monotonic" else 1.5
        ref = _reference_start_ids(torch.from_numpy(h), thr, kw["threshold_add"], kw["monotonic"],
                                   include_next_token)
        ours = entropy_patch_lengths(h, thr, include_next_token=include_next_token, reference_quirks=True, **kw)
        assert L(patch_starts(ours)) == ref


def test_global_matches_transformers_blt_patcher():
    pytest.importorskip("transformers")
    from transformers.models.blt.modeling_blt import BltPatcher

    rng = np.random.default_rng(2)
    h = torch.from_numpy(rng.gamma(2.0, 1.0, (4, 40)).astype(np.float32))
    hf = BltPatcher.patch_lengths_from_entropies(h, sequence_length=40, threshold=1.7)
    for i in range(4):
        # HF patches the next token as well (include_next_token=True) but pads its rows with 0s and a -1:
        # compare the patch starts read from the positive prefix of each row
        row = hf[i].tolist()
        k = next((j for j, x in enumerate(row) if x <= 0), len(row))
        theirs = [s for s in np.concatenate([[0], np.cumsum(row[:k])]).tolist() if s <= 40]
        ours = patch_starts(entropy_patch_lengths(h[i], 1.7, include_next_token=True))
        assert L(ours) == sorted(set(theirs))


# ------------------------------------------------------------------------------------------ incrementality
PATCHERS = [
    Patcher("entropy", threshold=1.5),
    Patcher("entropy", threshold=0.3, monotonic=True),
    Patcher("entropy", threshold=0.3, monotonic=True, reference_quirks=True),
    Patcher("entropy", threshold=1.2, threshold_add=0.1),
    Patcher("entropy", threshold=1.2, threshold_add=0.1, reference_quirks=True),
    Patcher("entropy", threshold=2.5, max_patch_length=4),
    Patcher("space"),
    Patcher("space", max_patch_length=3),
    Patcher("static", static_size=3),
    Patcher("static", static_size=5, max_patch_length=2),
    Patcher("byte"),
]


@pytest.mark.parametrize("patcher", PATCHERS, ids=lambda p: f"{p.mode}-{p.monotonic}-{p.threshold_add}-"
                         f"{p.max_patch_length}-{p.reference_quirks}")
def test_incremental(patcher):
    """Patch starts of every prefix == the whole sequence's starts inside it (both include_next_token)."""
    rng = np.random.default_rng(3)
    text = b"def f(x):\n    return x + 1  # caf\xc3\xa9, \xff\x00 ok...  \n\n"
    for _ in range(10):
        n = int(rng.integers(1, 40))
        data = bytes(rng.choice(list(text), n))
        tokens = np.array(encode(data))
        h = rng.gamma(2.0, 1.0, tokens.size).astype(np.float32)
        full = set(patch_starts(patcher.patch_lengths(tokens, h)).tolist())
        full_next = set(patch_starts(patcher.patch_lengths(tokens, h, include_next_token=True)).tolist())
        assert full == {s for s in full_next if s < tokens.size}
        for k in range(1, tokens.size + 1):
            pre = patcher.patch_lengths(tokens[:k], h[:k])
            assert pre.sum() == k and pre.dtype == np.int32 and pre[0] == 1
            assert set(patch_starts(pre).tolist()) == {s for s in full if s < k}
            pre_next = patcher.patch_lengths(tokens[:k], h[:k], include_next_token=True)
            assert pre_next.sum() == k + 1
            assert set(patch_starts(pre_next).tolist()) == {s for s in full_next if s <= k}


# ------------------------------------------------------------------------------------------ Patcher API
def test_patcher_from_config_and_batch():
    cfg = PatchConfig(mode="entropy", threshold=None, max_patch_length=3)
    p = Patcher.from_config(cfg, threshold=1.5)
    assert p.threshold == 1.5 and p.max_patch_length == 3 and p.needs_entropies
    with pytest.raises(ValueError):
        Patcher.from_config(cfg).patch_lengths(entropies=H)  # no threshold
    batch = p.patch_batch(entropies=torch.tensor([H, H[::-1]]), include_next_token=True)
    assert batch.dtype == torch.long and batch.shape[0] == 2
    assert batch.sum(1).tolist() == [9, 9]
    assert pad_patch_lengths([[1, 2], [3]]).tolist() == [[1, 2], [3, 0]]
    with pytest.raises(ValueError):
        Patcher("bogus")  # type: ignore[arg-type]
    assert Patcher.from_config(PatchConfig(mode="static", static_size=2)).patch_lengths([1, 4, 5, 6, 2]).tolist() \
        == [1, 2, 2]


def test_bytes_per_patch_definition():
    # two documents: 8 tokens in 4 patches and 3 tokens in 2 patches -> 11 / 6 (BOS patch and EOS included)
    assert bytes_per_patch([[1, 2, 2, 3], [1, 2]]) == pytest.approx(11 / 6)


# ------------------------------------------------------------------------------------------ calibration
def _synthetic(seed=0, docs=40):
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.0, int(rng.integers(50, 800))).astype(np.float16) for _ in range(docs)]


@pytest.mark.parametrize("target", [2.0, 4.5, 8.0])
@pytest.mark.parametrize("kind", ["global", "monotonic", "relative", "maxlen"])
def test_calibration_synthetic(target, kind):
    seqs = _synthetic()
    kw = {"global": {}, "monotonic": {"monotonic": True}, "relative": {"threshold_add": 0.0},
          "maxlen": {"max_patch_length": 16}}[kind]
    theta = calibrate_threshold(seqs, target, **kw)
    p = Patcher("entropy", threshold=theta, **kw)
    achieved = bytes_per_patch(p.patch_lengths(entropies=h) for h in seqs)
    assert abs(achieved - target) <= 0.05 * target, (kind, target, theta, achieved)
    theta2, ach2 = calibrate_threshold(seqs, target, return_achieved=True, **kw)
    assert theta2 == theta and ach2 == pytest.approx(achieved)  # deterministic, and self-consistent


def _trigram_entropies(docs: list[bytes]) -> list[np.ndarray]:
    """Stand-in for an entropy model: entropy of the add-0.1 trigram next-token distribution after each token."""
    toks = [np.array(encode(d)) for d in docs]
    ctx = [t[:-1] * 260 + t[1:] for t in toks]  # context (t[i-1], t[i]) predicts t[i+1]
    keys = np.unique(np.concatenate(ctx))
    counts = np.full((keys.size, 260), 0.1)
    rows = np.searchsorted(keys, np.concatenate([c[:-1] for c in ctx]))
    np.add.at(counts, (rows, np.concatenate([t[2:] for t in toks])), 1)
    p = counts / counts.sum(1, keepdims=True)
    ent = -(p * np.log(p)).sum(1)
    out = []
    for t, c in zip(toks, ctx):
        h = np.full(t.size, np.log(260.0))  # first token: no context yet
        h[1:] = ent[np.searchsorted(keys, c)]
        out.append(h.astype(np.float16))
    return out


def test_calibration_on_tokens_sample():
    root = Path(os.__file__).parent  # real text that exists on every machine
    files = sorted(root.glob("*.py"))[:30]
    docs = [f.read_bytes()[:3000] for f in files]
    seqs = _trigram_entropies(docs)
    for target in (3.0, 4.5):
        theta = calibrate_threshold(seqs, target)
        lengths = [Patcher("entropy", threshold=theta).patch_lengths(entropies=h) for h in seqs]
        assert abs(bytes_per_patch(lengths) - target) <= 0.05 * target
        assert all(pl.sum() == len(d) + 2 for pl, d in zip(lengths, docs))


def test_calibration_unreachable_target_warns():
    seqs = [np.ones(10, dtype=np.float32)]  # every candidate has the same score: only 1 or 9 bytes/patch-ish
    with pytest.warns(RuntimeWarning):
        calibrate_threshold(seqs, 3.0)
    with pytest.raises(ValueError):
        calibrate_threshold([], 3.0)
