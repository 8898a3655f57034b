"""Incremental BLT generation equals the full recompute (logits and greedy bytes), on random tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blt_model.config import BltConfig, EntropyModelConfig, TransformerShape
from blt_model.entropy_model import ByteLM, entropy
from blt_model.generation import BLTDecoderState, full_recompute_logits, generate, sample_next
from blt_model.model import BLT
from blt_model.patching import Patcher

PROMPT = b"def hello(x):\n    return x * 2  # \xc3\xa9"


def _models(all_enc=False, glob_dim=64, kv=None, window=8, seed=0):
    torch.manual_seed(seed)
    cfg = BltConfig(
        encoder=TransformerShape(dim=32, n_layers=2, n_heads=4, n_kv_heads=kv),
        global_=TransformerShape(dim=glob_dim, n_layers=2, n_heads=4),
        decoder=TransformerShape(dim=32, n_layers=2, n_heads=4, n_kv_heads=kv),
        cross_attn_k=2, hash_sizes=[3, 4], hash_vocab=97, window=window, max_seqlen=512,
        cross_attn_all_layers_encoder=all_enc,
    )
    blt = BLT(cfg).eval()
    ent = ByteLM(EntropyModelConfig(shape=TransformerShape(dim=32, n_layers=2, n_heads=2), window=window)).eval()
    return blt, ent


def _theta(ent, q=0.5):
    """A threshold near the q-quantile of the entropies, placed mid-way in the widest gap between two of
    them, so that float noise between the cached and the full computation cannot flip a boundary."""
    ids = torch.tensor([[1] + [b + 4 for b in PROMPT * 3]])
    with torch.no_grad():
        v = entropy(ent(ids))[0].sort().values
    n = len(v)
    lo, hi = max(0, int(n * (q - 0.25))), min(n - 2, int(n * (q + 0.25)))
    i = max(range(lo, hi + 1), key=lambda j: float(v[j + 1] - v[j]))
    return float(v[i] + v[i + 1]) / 2


@pytest.mark.parametrize("all_enc,glob_dim,kv", [(False, 64, None), (True, 48, 2)])
def test_cached_logits_match_full_recompute(all_enc, glob_dim, kv):
    blt, ent = _models(all_enc, glob_dim, kv)
    patcher = Patcher(mode="entropy", threshold=_theta(ent), max_patch_length=6)
    toks = [1] + [b + 4 for b in PROMPT]
    state = BLTDecoderState(blt, patcher, ent)
    state.extend(toks[:7])  # a prefill chunk, then byte by byte
    for i in range(7, len(toks)):
        got = state.extend(toks[i:i + 1])
        want = full_recompute_logits(blt, patcher, ent, toks[: i + 1])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    lengths = state.patch_lengths()
    assert lengths.sum() == len(toks) + 1 and lengths.max() > 1 and len(lengths) > 4  # multi-byte patches
    # a whole-sequence chunk gives the same last logits as byte-by-byte
    s2 = BLTDecoderState(blt, patcher, ent)
    torch.testing.assert_close(s2.extend(toks), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["entropy", "monotonic", "space"])
def test_greedy_cached_equals_full_recompute(mode):
    blt, ent = _models()
    if mode == "space":
        patcher = Patcher(mode="space")
    elif mode == "monotonic":
        patcher = Patcher(mode="entropy", threshold=0.0, monotonic=True)
    else:
        patcher = Patcher(mode="entropy", threshold=_theta(ent, 0.6))
    cached = generate(blt, patcher, ent, PROMPT, max_bytes=48, stop_at_eos=False)
    full = generate(blt, patcher, ent, PROMPT, max_bytes=48, use_cache=False, stop_at_eos=False)
    assert len(cached.data) == 48
    assert cached.data == full.data
    pl = np.asarray(cached.patch_lengths)
    assert pl.sum() == 1 + len(PROMPT) + 48 and pl.max() > 1


def test_sampling_is_seeded_and_matches():
    blt, ent = _models(seed=1)
    patcher = Patcher(mode="entropy", threshold=_theta(ent))
    a = generate(blt, patcher, ent, "x = ", max_bytes=24, temperature=0.8, top_p=0.9, seed=3, stop_at_eos=False)
    b = generate(blt, patcher, ent, "x = ", max_bytes=24, temperature=0.8, top_p=0.9, seed=3, use_cache=False,
                 stop_at_eos=False)
    assert a.data == b.data and len(a.data) == 24
    assert isinstance(a.text(), str)


def test_sample_next_rules():
    logits = torch.full((260,), -10.0)
    logits[1] = 100.0  # BOS is never produced
    logits[70] = 5.0
    logits[71] = 4.9
    assert sample_next(logits) == 70
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(20)} == {70}


def test_python_hash_ids_match_torch():
    from blt_model.hashing import hash_ids

    blt, ent = _models()
    blt.cfg.hash_functions  # noqa: B018
    state = BLTDecoderState(blt, Patcher(mode="byte"), None)
    toks = [1] + [b + 4 for b in PROMPT]
    cfg = blt.cfg
    for i in range(1, len(toks) + 1):
        state.tokens = toks[:i]
        want = hash_ids(torch.tensor([toks[:i]]), cfg.hash_sizes, cfg.hash_functions, cfg.hash_vocab)[0, -1]
        assert state._hash_ids_last() == want.tolist()
