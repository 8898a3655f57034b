"""BLT: cross-attention locality, causality with incremental patches, document isolation, conventions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blt_model.config import BltConfig, EntropyModelConfig, TransformerShape
from blt_model.entropy_model import ByteLM, entropy
from blt_model.layers import CrossAttention
from blt_model.masks import decoder_patch_ids, patch_ids_from_lengths
from blt_model.model import BLT


def small_cfg(**kw) -> BltConfig:
    base = dict(
        encoder=TransformerShape(dim=32, n_layers=1, n_heads=4, ffn_dim=64),
        global_=TransformerShape(dim=64, n_layers=2, n_heads=4, ffn_dim=128),
        decoder=TransformerShape(dim=32, n_layers=2, n_heads=4, ffn_dim=64),
        cross_attn_k=2, hash_sizes=[3, 4], hash_vocab=64, window=8, max_seqlen=256,
    )
    base.update(kw)
    return BltConfig(**base)


def _blt(seed=0, **kw) -> BLT:
    torch.manual_seed(seed)
    return BLT(small_cfg(**kw)).eval()


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ cross-attention


def test_encoder_cross_attention_sees_only_its_patch_and_matches_dense():
    torch.manual_seed(0)
    ca = CrossAttention(32, 4).eval()
    lengths = torch.tensor([[1, 3, 2, 5, 1], [1, 1, 4, 4, 2]])  # sums to 12 = L; no empty patch
    L, P, K = 12, 5, 2
    pid = patch_ids_from_lengths(lengths, L)
    slots, states = _rand((2, P, K, 32), 1), _rand((2, L, 32), 2)
    out = ca.patches_from_bytes(slots, states, pid)
    # dense reference: the k slots of patch p attend to bytes with patch id p
    q = ca.q_proj(ca.q_norm(slots.reshape(2, P * K, 32))).view(2, P * K, 4, 8).transpose(1, 2)
    kv = ca.k_norm(states)
    k = ca.k_proj(kv).view(2, L, 4, 8).transpose(1, 2)
    v = ca.v_proj(kv).view(2, L, 4, 8).transpose(1, 2)
    mask = (torch.arange(P).repeat_interleave(K).view(1, -1, 1) == pid.view(2, 1, L)).unsqueeze(1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, P * K, 32)
    ref = slots.reshape(2, P * K, 32) + ca.o_proj(ref)
    torch.testing.assert_close(out.reshape(2, P * K, 32), ref, atol=1e-5, rtol=0)
    # perturb the bytes of patch 3 (positions 6..10 of row 0): only patch 3 changes
    s2 = states.clone()
    s2[0, 6:11] += 1.0
    out2 = ca.patches_from_bytes(slots, s2, pid)
    changed = (out2 - out).abs().amax(dim=(2, 3))
    assert changed[0, 3] > 1e-3
    assert changed[0, [0, 1, 2, 4]].max() == 0 and changed[1].max() == 0


def test_encoder_cross_attention_empty_patch_is_zero_attention():
    torch.manual_seed(0)
    ca = CrossAttention(32, 4).eval()
    lengths = torch.tensor([[1, 3, 1]])  # L = 4; patch 2 is the next-byte slot alone (no byte)
    pid = patch_ids_from_lengths(lengths, 4)
    slots = _rand((1, 3, 2, 32), 3)
    out = ca.patches_from_bytes(slots, _rand((1, 4, 32), 4), pid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2], slots[0, 2])  # attention output 0 -> residual only


def test_decoder_cross_attention_matches_dense():
    torch.manual_seed(0)
    ca = CrossAttention(32, 4).eval()
    lengths = torch.tensor([[1, 3, 2, 5, 2]])
    L, P, K = 12, 5, 2
    dec = decoder_patch_ids(lengths, L)
    x, slots = _rand((1, L, 32), 5), _rand((1, P, K, 32), 6)
    out = ca.bytes_from_patches(x, slots, dec)
    q = ca.q_proj(ca.q_norm(x)).view(1, L, 4, 8).transpose(1, 2)
    kv = ca.k_norm(slots.reshape(1, P * K, 32))
    k = ca.k_proj(kv).view(1, P * K, 4, 8).transpose(1, 2)
    v = ca.v_proj(kv).view(1, P * K, 4, 8).transpose(1, 2)
    mask = (dec.view(1, L, 1) == torch.arange(P).repeat_interleave(K).view(1, 1, -1)).unsqueeze(1)
    ref = x + ca.o_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, L, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ causality


def _entropy_lengths(ent: ByteLM, ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Prefix-stable threshold patching with include_next_token: starts {0, 1} + {t in [2, L]: H[t-1] > theta}."""
    L = ids.shape[1]
    H = entropy(ent(ids))[0]
    starts = [0, 1] + [t for t in range(2, L + 1) if H[t - 1] > theta]
    ends = starts[1:] + [L + 1]
    return torch.tensor([[e - s for s, e in zip(starts, ends)]])


def test_causality_with_incremental_patches():
    torch.manual_seed(1)
    ent = ByteLM(EntropyModelConfig(shape=TransformerShape(dim=32, n_layers=1, n_heads=4, ffn_dim=64), window=16))
    ent.eval()
    blt = _blt(seed=2)
    L = 28
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 260, (1, L), generator=g)
    ids[0, 0] = 1
    theta = float(ent.entropies(ids)[0].median())
    with torch.no_grad():
        lengths = _entropy_lengths(ent, ids, theta)
        assert 4 < lengths.shape[1] < L  # a real mix of patch sizes
        base = blt(ids, lengths)
        n_checked = 0
        for t in range(0, L - 1, 3):
            x = ids.clone()
            x[0, t + 1:] = torch.randint(4, 260, (L - t - 1,), generator=g)  # change byte t+1 (and all later ones)
            lx = _entropy_lengths(ent, x, theta)
            out = blt(x, lx)
            torch.testing.assert_close(out[0, : t + 1], base[0, : t + 1], atol=2e-5, rtol=0)
            assert (out[0, t + 1:] - base[0, t + 1:]).abs().max() > 1e-4  # later positions do see the change
            n_checked += 1
        assert n_checked >= 9


def test_decoder_reads_latest_complete_patch():
    """Byte t's logits depend on the global output of d(t), not on a patch that is still open at t."""
    blt = _blt(seed=4)
    L = 12
    ids = torch.randint(4, 260, (1, L), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([[1, 3, 4, 5]])  # patches [0] [1..3] [4..7] [8..11 + slot]
    captured = {}

    def hook(mod, args, out):
        captured["g"] = out

    h = blt.global_transformer.register_forward_hook(hook)
    with torch.no_grad():
        base = blt(ids, lengths)
        h.remove()
        # perturb the global output of patch 2 ([4..7]): only bytes with d(t)=2 change: t=7 (last byte of
        # patch 2) up to t=11 (patch 3 still open: it also covers the next-byte slot 12)
        g = captured["g"].clone()
        g[0, 2] += 5.0
        h2 = blt.global_transformer.register_forward_hook(lambda m, a, o: g)
        out = blt(ids, lengths)
        h2.remove()
    diff = (out - base).abs().amax(-1)[0]
    assert (diff[7:12] > 1e-4).all()
    assert diff[:7].max() == 0


# -------------------------------------------------------------------------------------------------- documents


def _doc(n, seed):
    body = torch.randint(4, 260, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat((torch.tensor([1]), body, torch.tensor([2])))


def _doc_patches(n_tokens: int, size: int = 3) -> list[int]:
    out, rest = [1], n_tokens - 1
    while rest > 0:
        out.append(min(size, rest))
        rest -= out[-1]
    return out


def test_document_isolation():
    blt = _blt(seed=6, window=6)
    d1, d2 = _doc(9, 7), _doc(13, 8)  # 11 and 15 tokens, both longer than the window
    row = torch.cat((d1, d2)).unsqueeze(0)
    lengths_row = torch.tensor([_doc_patches(len(d1)) + _doc_patches(len(d2)) + [1]])
    lengths_alone = torch.tensor([_doc_patches(len(d2)) + [1]])
    with torch.no_grad():
        packed = blt(row, lengths_row)
        alone = blt(d2.unsqueeze(0), lengths_alone)
        torch.testing.assert_close(packed[:, len(d1):], alone, atol=3e-5, rtol=0)
        # the second document does not change the first one either
        first = blt(d1.unsqueeze(0), torch.tensor([_doc_patches(len(d1)) + [1]]))
        torch.testing.assert_close(packed[:, : len(d1)], first, atol=3e-5, rtol=0)
        # without document masks the first document leaks (transformers' behaviour)
        leaky = blt(row, lengths_row, doc_masks=False)
        assert (leaky[:, len(d1):] - alone).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- conventions


def test_length_conventions_and_padding():
    blt = _blt(seed=9)
    L = 15
    ids = torch.randint(4, 260, (2, L), generator=torch.Generator().manual_seed(10))
    hf = torch.tensor([[1, 4, 4, 6], [1, 2, 5, 7]])  # sum L
    official = hf.clone()
    official[:, -1] += 1  # sum L+1, slot L continues the last patch
    padded = torch.cat((hf, torch.zeros(2, 2, dtype=torch.long)), 1)
    mixed = torch.tensor([[1, 4, 4, 6, 0], [1, 2, 5, 7, 1]])  # row 1: slot alone -> last byte reads own patch
    with torch.no_grad():
        a, b, c = blt(ids, hf), blt(ids, official), blt(ids, padded)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=2e-5, rtol=0)
        m = blt(ids, mixed)
    torch.testing.assert_close(m[0], a[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(m[1, :-1], a[1, :-1], atol=2e-5, rtol=0)
    assert (m[1, -1] - a[1, -1]).abs().max() > 1e-4


def test_training_step_gradients():
    blt = _blt(seed=11, cross_attn_all_layers_encoder=True, hash_functions=2)
    blt.train()
    ids = torch.cat((_doc(6, 1), _doc(8, 2), torch.tensor([1, 77, 78]))).unsqueeze(0).repeat(2, 1)
    L = ids.shape[1] - 1
    x, y = ids[:, :-1], ids[:, 1:]
    lengths = torch.tensor([[1, 3, 4, 1, 3, 3, 3, 1, 1, 1]] * 2)  # last patch: next-byte slot only (empty)
    assert lengths.sum(1).tolist() == [L + 1, L + 1]
    logits = blt(x, lengths)
    assert logits.shape == (2, L, 260) and logits.dtype == torch.float32
    F.cross_entropy(logits.reshape(-1, 260), y.reshape(-1)).backward()
    for name, p in blt.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert blt.local_encoder.cross_attn_layers[0].q_proj.weight.grad.abs().sum() > 0
