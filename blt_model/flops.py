"""Model FLOPs per byte (analytic, BLT_REFERENCE §4.5 style): matmuls + attention, embeddings free.

A matmul ``[m, n] x [n, p]`` costs ``2*m*n*p``. Attention over ``c`` visible keys costs ``4 * c * d_model``
per query (``QK^T`` plus ``PV``; ``d_model = heads * head_dim``). Visible keys follow the mask structure:
local layers are causal with a sliding window over a row of ``seq_bytes`` bytes (mean of ``min(t+1, w)``),
the global transformer is causal over ``seq_bytes / bytes_per_patch`` patches (mean ``(P+1)/2``), the
encoder cross-attention sees the ``bytes_per_patch`` bytes of its patch, the decoder cross-attention the
``k`` slots of one patch. Softmax, norms, RoPE and elementwise work are not counted. Training = 3x forward
(backward = 2x forward). Document masks (which only remove work) are ignored.
"""

from __future__ import annotations

from .config import BltConfig, EntropyModelConfig, TransformerShape


def mean_causal_context(seq_len: float, window: float | None = None) -> float:
    """Mean number of visible keys per query for a causal (optionally windowed) mask over ``seq_len``."""
    n = int(round(seq_len))
    if n <= 0:
        return 0.0
    if window is None or window >= n:
        return (n + 1) / 2.0
    w = int(window)
    # t = 0..w-1 see t+1 keys; the remaining n-w queries see w keys
    return (w * (w + 1) / 2.0 + (n - w) * w) / n


def _block_linear(s: TransformerShape) -> float:
    """Matmul FLOPs per token of one transformer block (q, k, v, o + SwiGLU)."""
    d, kv = s.dim, s.kv_heads * s.head_dim
    return 2.0 * (d * d + 2 * d * kv + d * d) + 2.0 * 3 * d * s.hidden_dim


def _attn(s: TransformerShape, ctx: float) -> float:
    return 4.0 * s.n_heads * s.head_dim * ctx


def _finish(d: dict[str, float], keys_linear, keys_attn) -> dict[str, float]:
    d["matmul"] = sum(d[k] for k in keys_linear)
    d["attention"] = sum(d[k] for k in keys_attn)
    d["total_forward"] = d["matmul"] + d["attention"]
    d["total_train"] = 3.0 * d["total_forward"]
    return d


def blt_flops_per_byte(cfg: BltConfig, bytes_per_patch: float, seq_bytes: float) -> dict[str, float]:
    """Forward FLOPs per byte of each BLT component, plus ``total_forward`` and ``total_train`` (3x).

    Components: ``encoder``/``global``/``decoder`` (their transformer blocks incl. attention, global incl. its
    input projection), ``cross_attention`` (both cross-attentions incl. pooling/patch projections), ``head``.
    Finer keys: ``*_linear``/``*_attn``; ``matmul`` = all linear layers (what ``FlopCounterMode`` sees),
    ``attention`` = all attention score/value products.
    """
    bpp = float(bytes_per_patch)
    k = cfg.cross_attn_k
    e, g, dd = cfg.encoder, cfg.global_, cfg.decoder
    n_patches = seq_bytes / bpp
    ctx_local = mean_causal_context(seq_bytes, cfg.window)
    ctx_global = mean_causal_context(n_patches)
    d: dict[str, float] = {}
    d["encoder_linear"] = e.n_layers * _block_linear(e)
    d["encoder_attn"] = e.n_layers * _attn(e, ctx_local)
    n_ca_e = e.n_layers if cfg.cross_attn_all_layers_encoder else 1
    kv_e = e.kv_heads * e.head_dim
    d["encoder_cross_linear"] = (
        2.0 * e.dim * (k * e.dim) / bpp  # pooled -> k slots
        + n_ca_e * (2.0 * 2 * e.dim * e.dim * k / bpp + 2.0 * 2 * e.dim * kv_e)  # q,o on slots; k,v on bytes
    )
    d["encoder_cross_attn"] = n_ca_e * 4.0 * e.dim * k  # k slots/patch x bpp bytes, per byte
    proj = 2.0 * (k * e.dim) * g.dim if cfg.global_input_projection else 0.0
    d["global_linear"] = (proj + g.n_layers * _block_linear(g)) / bpp
    d["global_attn"] = g.n_layers * _attn(g, ctx_global) / bpp
    n_ca_d = dd.n_layers if cfg.cross_attn_all_layers_decoder else 1
    kv_d = dd.kv_heads * dd.head_dim
    d["decoder_cross_linear"] = (
        2.0 * g.dim * (k * dd.dim) / bpp  # global out -> k slots
        + n_ca_d * (2.0 * 2 * dd.dim * dd.dim + 2.0 * 2 * dd.dim * kv_d * k / bpp)  # q,o on bytes; k,v on slots
    )
    d["decoder_cross_attn"] = n_ca_d * 4.0 * dd.dim * k
    d["decoder_linear"] = dd.n_layers * _block_linear(dd)
    d["decoder_attn"] = dd.n_layers * _attn(dd, ctx_local)
    d["head"] = 2.0 * dd.dim * cfg.vocab_size
    d["encoder"] = d["encoder_linear"] + d["encoder_attn"]
    d["global"] = d["global_linear"] + d["global_attn"]
    d["decoder"] = d["decoder_linear"] + d["decoder_attn"]
    d["cross_attention"] = (
        d["encoder_cross_linear"] + d["encoder_cross_attn"] + d["decoder_cross_linear"] + d["decoder_cross_attn"]
    )
    linear = ["encoder_linear", "encoder_cross_linear", "global_linear", "decoder_cross_linear", "decoder_linear",
              "head"]
    attn = ["encoder_attn", "encoder_cross_attn", "global_attn", "decoder_cross_attn", "decoder_attn"]
    return _finish(d, linear, attn)


def bytelm_flops_per_byte(cfg: EntropyModelConfig, seq_bytes: float) -> dict[str, float]:
    """Forward FLOPs per byte of a :class:`ByteLM` (``layers``, ``head``, ``total_forward``, ``total_train``)."""
    s = cfg.shape
    d = {
        "layers_linear": s.n_layers * _block_linear(s),
        "layers_attn": s.n_layers * _attn(s, mean_causal_context(seq_bytes, cfg.window)),
        "head": 2.0 * s.dim * cfg.vocab_size,
    }
    d["layers"] = d["layers_linear"] + d["layers_attn"]
    return _finish(d, ["layers_linear", "head"], ["layers_attn"])


def params_non_embedding(cfg: BltConfig) -> int:
    """Non-embedding parameter count of a BLT (for 6N-style sanity checks)."""
    def block(s: TransformerShape) -> int:
        kv = s.kv_heads * s.head_dim
        return 2 * s.dim * s.dim + 2 * s.dim * kv + 3 * s.dim * s.hidden_dim + 2 * s.dim

    e, g, dd, k = cfg.encoder, cfg.global_, cfg.decoder, cfg.cross_attn_k
    ca = lambda s: 2 * s.dim * s.dim + 2 * s.dim * s.kv_heads * s.head_dim + 2 * s.dim  # noqa: E731
    n = e.n_layers * block(e) + g.n_layers * block(g) + dd.n_layers * block(dd)
    n += (e.n_layers if cfg.cross_attn_all_layers_encoder else 1) * ca(e)
    n += (dd.n_layers if cfg.cross_attn_all_layers_decoder else 1) * ca(dd)
    n += e.dim * e.dim * k + g.dim * dd.dim * k + dd.dim + dd.dim * cfg.vocab_size
    if cfg.global_input_projection:
        n += k * e.dim * g.dim
    return n


__all__ = ["mean_causal_context", "blt_flops_per_byte", "bytelm_flops_per_byte", "params_non_embedding"]
