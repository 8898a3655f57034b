"""ByteLM (entropy model / byte baseline): windows, documents, streaming cache, entropy."""

from __future__ import annotations

import math

import torch

from blt_model.config import EntropyModelConfig, TransformerShape
from blt_model.entropy_model import ByteLM, ByteLMCache, EntropyModel, entropy


def _model(n_layers=2, window=8, seed=0) -> ByteLM:
    torch.manual_seed(seed)
    cfg = EntropyModelConfig(shape=TransformerShape(dim=32, n_layers=n_layers, n_heads=4, ffn_dim=64), window=window)
    return ByteLM(cfg).eval()


def _ids(L, seed=0, B=2):
    return torch.randint(4, 260, (B, L), generator=torch.Generator().manual_seed(seed))


def test_shapes_alias_and_entropy():
    m = _model()
    assert EntropyModel is ByteLM
    logits = m(_ids(10))
    assert logits.shape == (2, 10, 260) and logits.dtype == torch.float32
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy(logits), ref, atol=1e-5, rtol=0)
    assert abs(entropy(torch.zeros(1, 260)).item() - math.log(260)) < 1e-5
    assert entropy(torch.tensor([[0.0] + [-1e4] * 259])).item() < 1e-6


def test_causal_and_sliding_window_receptive_field():
    m = _model(n_layers=1, window=8)
    ids = _ids(20, B=1)
    base = m(ids)
    t = 15
    for src, changes in ((t - 8, False), (t - 7, True), (t + 1, False)):  # window: q - k < 8
        x = ids.clone()
        x[0, src] = (x[0, src] - 4 + 1) % 256 + 4
        diff = (m(x)[0, t] - base[0, t]).abs().max().item()
        assert (diff > 1e-6) == changes, (src, diff)


def test_chunked_with_cache_equals_full_pass():
    m = _model(n_layers=3, window=8)
    ids = _ids(37)
    ids[0, 9] = 2  # an EOS inside row 0 (document split in the middle of a chunk)
    ids[1, 20] = 2
    full = m(ids)
    for chunks in ([5, 5, 5, 5, 5, 5, 5, 2], [1] * 12 + [25], [16, 21], [3, 11, 2, 21]):
        cache = ByteLMCache()
        parts = [m(c, cache=cache) for c in ids.split(chunks, dim=1)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=0)
        assert cache.pos == 37 and cache.layers[0][0].shape[2] <= 8
        assert cache.eos_count.tolist() == [1, 1]
    torch.testing.assert_close(m.entropies(ids, chunk_len=7), entropy(full), atol=2e-5, rtol=0)


def test_document_masks():
    m = _model(n_layers=2, window=64)
    doc1 = torch.tensor([[1, 50, 60, 70, 80, 2]])
    doc2 = torch.tensor([[1, 90, 91, 92, 93, 94, 95, 2]])
    alone = m(doc2)
    packed = m(torch.cat((doc1, doc2), 1))
    torch.testing.assert_close(packed[:, 6:], alone, atol=2e-5, rtol=0)  # RoPE is relative: same logits
    # without doc masks the first document leaks into the second
    leaky = m(torch.cat((doc1, doc2), 1), doc_masks=False)
    assert (leaky[:, 6:] - alone).abs().max().item() > 1e-4
    # and the first document is unaffected by what follows
    torch.testing.assert_close(packed[:, :6], m(doc1), atol=2e-5, rtol=0)


def test_gradients_flow():
    m = _model()
    m.train()
    ids = _ids(12)
    ids[0, 5] = 2
    loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).reshape(-1, 260), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
