"""Analytic FLOPs per byte vs torch's FlopCounterMode (matmul part; CPU SDPA is not counted by torch)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blt_model.config import BltConfig, EntropyModelConfig, TransformerShape, reference_tiny_entropy
from blt_model.entropy_model import ByteLM
from blt_model.flops import blt_flops_per_byte, bytelm_flops_per_byte, mean_causal_context
from blt_model.model import BLT


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            fn()
    return fc.get_total_flops()


def test_mean_causal_context():
    assert mean_causal_context(4) == 2.5
    assert mean_causal_context(6, window=2) == (1 + 2 * 5) / 6
    assert mean_causal_context(10, window=100) == 5.5


@pytest.mark.parametrize("all_layers,proj", [(False, False), (True, True)])
def test_blt_matmul_flops_match_counter(all_layers, proj):
    cfg = BltConfig(
        encoder=TransformerShape(dim=32, n_layers=2, n_heads=4, ffn_dim=64),
        global_=TransformerShape(dim=96 if proj else 64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
        decoder=TransformerShape(dim=32, n_layers=2, n_heads=4, ffn_dim=64),
        cross_attn_k=2, hash_sizes=[3, 4], hash_vocab=64, window=8,
        cross_attn_all_layers_encoder=all_layers, cross_attn_all_layers_decoder=all_layers,
    )
    torch.manual_seed(0)
    m = BLT(cfg).eval()
    B, L = 2, 24
    lengths = torch.tensor([[1] + [4] * 5 + [3]] * B)  # 7 patches over L (sum L), so bytes/patch = 24/7
    ids = torch.randint(4, 260, (B, L))
    counted = _count(lambda: m(ids, lengths))
    est = blt_flops_per_byte(cfg, bytes_per_patch=L / 7, seq_bytes=L)
    assert counted == pytest.approx(est["matmul"] * B * L, rel=1e-9)
    assert est["total_train"] == pytest.approx(3 * est["total_forward"])
    parts = ("encoder", "global", "decoder", "cross_attention", "head")
    assert sum(est[p] for p in parts) == pytest.approx(est["total_forward"])


def test_bytelm_matmul_flops_match_counter():
    cfg = EntropyModelConfig(shape=TransformerShape(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96), window=8)
    torch.manual_seed(0)
    m = ByteLM(cfg).eval()
    counted = _count(lambda: m(torch.randint(4, 260, (2, 20))))
    est = bytelm_flops_per_byte(cfg, 20)
    assert counted == pytest.approx(est["matmul"] * 2 * 20, rel=1e-9)


def test_reference_numbers():
    """The reference json's forward FLOPs/byte: BLT 22.16e6, patcher 8.52e6 (1024 bytes, 229 patches)."""
    est = blt_flops_per_byte(BltConfig.reference_tiny(), 1024 / 229, 1024)
    assert est["total_forward"] == pytest.approx(22.16e6, rel=2e-3)
    assert bytelm_flops_per_byte(reference_tiny_entropy(), 1024)["total_forward"] == pytest.approx(8.52e6, rel=2e-3)
