"""Parity with transformers' BltForCausalLM (5.24) at the reference tiny shape (random init, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blt_model.config import BltConfig  # noqa: E402
from blt_model.convert import configs_from_hf, from_hf, to_hf  # noqa: E402
from blt_model.entropy_model import ByteLMCache, entropy  # noqa: E402

REF = Path(__file__).resolve().parents[1] / "bench" / "blt_cpu_reference.json"  # copy of shared/bench/


def _kwargs() -> dict:
    if REF.exists():
        kw = json.loads(REF.read_text())["transformers_BltConfig_kwargs"]
    else:  # same values, inline
        kw = dict(vocab_size=260, max_position_embeddings=4096, patch_in_forward=True, patch_size=4,
                  patching_mode="entropy", patching_threshold=5.152426242828369, max_patch_length=None,
                  local_attention_window_len=512, cross_attn_k=2, encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8],
                  encoder_hash_byte_group_vocab=4096, encoder_hash_byte_group_nb_functions=1, use_cache=False,
                  patcher_config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=768, max_position_embeddings=8192, sliding_window=512),
                  encoder_config=dict(hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=768, hidden_size_global=512, cross_attn_k=2,
                                      max_position_embeddings=8192),
                  decoder_config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=768, hidden_size_global=512, cross_attn_k=2,
                                      max_position_embeddings=8192),
                  global_config=dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                     intermediate_size=1536, max_position_embeddings=4096))
    kw = dict(kw)
    # the reference shape, with short windows so that an 80-byte row exercises them
    kw["local_attention_window_len"] = 32
    kw["patcher_config"] = dict(kw["patcher_config"], sliding_window=16)
    return kw


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = transformers.BltConfig(**_kwargs())
    cfg._attn_implementation = "sdpa"
    hf = transformers.BltForCausalLM(cfg).eval()
    blt, ent = from_hf(hf)
    return hf, blt, ent


def _lengths(L: int, rule=(4, 5, 3, 7, 1, 2)) -> list[int]:
    out = [1]
    while sum(out) < L:
        out.append(min(rule[len(out) % len(rule)], L - sum(out)))
    return out


def test_config_mapping(models):
    hf, blt, ent = models
    assert blt.cfg.encoder.dim == 256 and blt.cfg.global_.n_layers == 6 and blt.cfg.decoder.n_layers == 4
    assert blt.cfg.window == 32 and blt.cfg.rope_theta == 500000.0 and blt.cfg.hash_vocab == 4096
    assert not blt.cfg.global_input_projection and blt.global_transformer.token_embedding_projection is None
    assert ent.cfg.window == 16 and ent.cfg.rope_theta == 10000.0 and ent.cfg.shape.n_layers == 4
    ref_tiny = BltConfig.reference_tiny()
    assert blt.cfg.model_copy(update={"window": 512}).model_dump() == ref_tiny.model_dump()


def test_logits_parity(models):
    hf, blt, ent = models
    L = 80
    ids = torch.randint(4, 260, (2, L), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1  # BOS; no EOS inside (transformers has no document masks)
    rows = [_lengths(L), _lengths(L, (2, 6, 1, 4))]  # each sums to L (transformers convention)
    P = max(map(len, rows))
    cases = []
    for b, r in enumerate(rows):  # sum L, one row at a time (a trailing 0 means something else to transformers)
        cases.append((ids[b : b + 1], torch.tensor([r])))
    off = torch.tensor([r[:-1] + [r[-1] + 1] + [0] * (P - len(r)) for r in rows])  # sum L+1, zero padded
    slot = torch.tensor([r + [1] + [0] * (P - len(r)) for r in rows])  # next-byte slot as its own patch
    cases += [(ids, off), (ids, slot)]
    with torch.no_grad():
        for x, pl in cases:
            ref = hf(input_ids=x, patch_lengths=pl, use_cache=False).logits
            ours = blt(x, pl)
            assert ours.dtype == torch.float32 and ours.shape == ref.shape == (x.shape[0], L, 260)
            assert (ours - ref).abs().max().item() <= 1e-4


def test_entropy_parity(models):
    hf, blt, ent = models
    L = 70
    ids = torch.randint(4, 260, (2, L), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 1
    with torch.no_grad():
        H_hf, _, logits_hf = hf.model.patcher(ids, patch_size=None)
        logits = ent(ids)
        assert (logits - logits_hf).abs().max().item() <= 1e-4
        assert (entropy(logits) - H_hf).abs().max().item() <= 1e-4
        cache = ByteLMCache()  # streamed in chunks through the rolling cache: same entropies
        H_chunked = torch.cat([entropy(ent(c, cache=cache)) for c in ids.split(9, dim=1)], 1)
        assert (H_chunked - H_hf).abs().max().item() <= 1e-4


def test_round_trip_state_dict(models):
    hf, blt, ent = models
    hf2 = to_hf(blt, ent)
    s1, s2 = hf.state_dict(), hf2.state_dict()
    assert set(s1) == set(s2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    b2, e2 = configs_from_hf(hf2.config)
    assert b2 == blt.cfg and e2 == ent.cfg
