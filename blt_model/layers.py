"""Transformer building blocks shared by the entropy model and the BLT (pure torch, no I/O).

Parameter names follow transformers' BLT port (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``, cross-attention ``q_norm``/``k_norm``) so state dicts map
one to one. The math follows the official code: pre-norm blocks, RMSNorm (eps 1e-5), SwiGLU FFN, no biases,
RoPE rotating *adjacent pairs* ``(x[2i], x[2i+1])``, attention scale ``1/sqrt(head_dim)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------ norms


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


# ------------------------------------------------------------------------------------------------- RoPE


class RotaryEmbedding(nn.Module):
    """cos/sin tables for interleaved-pair RoPE: pair ``i`` rotates by ``pos * theta**(-2i/head_dim)``.

    Holds no tensors (so models can be built on the meta device); the last table is cached.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        self._cache: tuple | None = None

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions[L]`` (int) -> ``(cos, sin)`` each ``[L, head_dim/2]`` float32."""
        c = self._cache
        if c is not None and c[0].device == positions.device and c[0].shape == positions.shape and torch.equal(
            c[0], positions
        ):
            return c[1], c[2]
        # angles in float64: fp32 loses ~0.01 rad at positions beyond ~1e5 (long documents)
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exps)
        freqs = positions.to(torch.float64).unsqueeze(-1) * inv_freq
        cos, sin = freqs.cos().float(), freqs.sin().float()
        self._cache = (positions.clone(), cos, sin)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x[B, L, H, D]`` with ``cos/sin[L, D/2]``:
    ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)``, done as one complex multiply (fp32 inside)."""
    dtype = x.dtype
    xf = x if dtype in (torch.float32, torch.float64) else x.float()
    rot = torch.complex(cos, sin).to(torch.complex128 if xf.dtype == torch.float64 else torch.complex64)
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)).contiguous()) * rot[:, None, :]
    return torch.view_as_real(xc).flatten(-2).to(dtype)


# --------------------------------------------------------------------------------------------- attention


#: query rows per block in :func:`sdpa`'s blocked path (rows shorter than twice this run in one call)
SDPA_BLOCK = 256


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over ``[B, H, L, D]``; ``mask`` boolean (True = attend) or None for plain causal (Lq == Lk).

    With a boolean mask and long rows, the queries are processed in blocks of ``SDPA_BLOCK`` rows and each
    block attends only to the key columns its mask rows allow at all (for causal, windowed and document
    masks: a band ending at the block's last row). The result is the same as one masked call; the work
    skipped is what the mask throws away (about 40% of a causal 1024-row window-512 attention).
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    L = q.shape[2]
    if mask.dtype != torch.bool or mask.dim() != 4 or L < 2 * SDPA_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    outs = []
    for s in range(0, L, SDPA_BLOCK):
        e = min(L, s + SDPA_BLOCK)
        m = mask[:, :, s:e]
        cols = m.any(dim=(0, 1, 2)).nonzero()
        if cols.numel() == 0:  # no query of the block sees anything: same as the dense call
            ks, ke = 0, k.shape[2]
        else:
            ks, ke = int(cols[0]), int(cols[-1]) + 1
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, ks:ke], v[:, :, ks:ke],
                                                   attn_mask=m[..., ks:ke], enable_gqa=gqa))
    return torch.cat(outs, dim=2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, mask, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Returns ``(out[B, L, dim], (k, v))`` with k/v ``[B, H_kv, S, D]`` post-RoPE (for a KV cache).

        ``past`` are cached keys/values prepended to this chunk's; ``mask`` must then be ``[.., L, S+L]``.
        """
        B, L, _ = x.shape
        hq, hk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight), 0)  # one fused matmul
        q, k, v = F.linear(x, w).split((hq, hk, hk), dim=-1)
        q = apply_rope(q.view(B, L, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, L, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        if mask is None and past is not None:
            raise ValueError("a mask is required with cached keys")
        out = sdpa(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B, L, hq)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat((self.gate_proj.weight, self.up_proj.weight), 0)
        g, u = F.linear(x, w).split((self.hidden, self.hidden), dim=-1)
        return self.down_proj(F.silu(g) * u)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.self_attn = SelfAttention(dim, n_heads, n_kv_heads)
        self.mlp = MLP(dim, hidden)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(self, x, cos, sin, mask, past=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


def make_blocks(shape, eps: float) -> nn.ModuleList:
    """``nn.ModuleList`` of ``shape.n_layers`` blocks for a ``config.TransformerShape``."""
    return nn.ModuleList(
        TransformerBlock(shape.dim, shape.n_heads, shape.n_kv_heads, shape.hidden_dim, eps) for _ in range(shape.n_layers)
    )


# ----------------------------------------------------------------------------------------- cross-attention


class CrossAttention(nn.Module):
    """BLT cross-attention: RMSNorm on queries and on keys/values, no RoPE, output ``x + attn`` (residual inside,
    as in the official code and transformers; callers add another residual -> ``2x + attn``).

    Two sparse forms, both computing exactly what the reference's dense masks compute but in O(L):
    :meth:`patches_from_bytes` (encoder: the k slots of patch j attend to the bytes of patch j) and
    :meth:`bytes_from_patches` (decoder: byte t attends to the k slots of patch d(t)).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(dim, eps)
        self.k_norm = RMSNorm(dim, eps)

    def _kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``states[..., S, dim]`` -> k, v ``[..., S, H, D]`` (KV heads repeated for GQA)."""
        hk = self.n_kv_heads * self.head_dim
        w = torch.cat((self.k_proj.weight, self.v_proj.weight), 0)
        k, v = F.linear(self.k_norm(states), w).split((hk, hk), dim=-1)
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=-2)
            v = v.repeat_interleave(rep, dim=-2)
        return k, v

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(self.q_norm(x)).unflatten(-1, (self.n_heads, self.head_dim))

    def patches_from_bytes(self, slots: torch.Tensor, byte_states: torch.Tensor, patch_ids: torch.Tensor):
        """Encoder pooling. ``slots[B, P, k, dim]`` query the bytes of their own patch.

        ``byte_states[B, L, dim]``; ``patch_ids[B, L]`` in ``[0, P)`` (ids ``>= P`` are ignored). A softmax
        over each patch's bytes is done as a segment softmax (gather the queries per byte, scatter the
        weighted values back), so no ``[k*P, L]`` mask exists. Slots of an empty patch get attention 0.
        Returns ``slots + o_proj(attn)`` with shape ``[B, P, k, dim]``.
        """
        B, P, K, dim = slots.shape
        L = byte_states.shape[1]
        H, D = self.n_heads, self.head_dim
        q = self._q(slots)  # [B, P, K, H, D]
        k, v = self._kv(byte_states)  # [B, L, H, D]
        valid = patch_ids < P
        pid = patch_ids.clamp(max=P - 1)
        qg = torch.gather(q.reshape(B, P, K * H * D), 1, pid.unsqueeze(-1).expand(B, L, K * H * D))
        qg = qg.view(B, L, K, H, D)
        s = (qg * k.unsqueeze(2)).sum(-1) * self.scale  # [B, L, K, H]
        s = s.masked_fill(~valid.view(B, L, 1, 1), float("-inf"))
        idx = pid.view(B, L, 1).expand(B, L, K * H)
        with torch.no_grad():
            m = torch.full((B, P, K * H), float("-inf"), dtype=s.dtype, device=s.device)
            m = m.scatter_reduce(1, idx, s.reshape(B, L, K * H), reduce="amax", include_self=True)
            m = torch.nan_to_num(m, neginf=0.0)
        e = torch.exp(s.reshape(B, L, K * H) - torch.gather(m, 1, idx))  # [B, L, K*H]
        den = torch.zeros(B, P, K * H, dtype=e.dtype, device=e.device).scatter_add(1, idx, e)
        wv = (e.view(B, L, K, H, 1) * v.unsqueeze(2)).reshape(B, L, K * H * D)
        num = torch.zeros(B, P, K * H * D, dtype=wv.dtype, device=wv.device)
        num = num.scatter_add(1, pid.view(B, L, 1).expand(B, L, K * H * D), wv)
        out = num.view(B, P, K, H, D) / den.view(B, P, K, H, 1).clamp_min(1e-30)
        return slots + self.o_proj(out.reshape(B, P, K, H * D))

    def bytes_from_patches(self, x: torch.Tensor, slots: torch.Tensor, patch_ids: torch.Tensor):
        """Decoder. ``x[B, L, dim]`` byte queries attend to the k slots ``slots[B, P, k, dim]`` of patch
        ``patch_ids[B, L]``. Returns ``x + o_proj(attn)``."""
        B, L, dim = x.shape
        P, K = slots.shape[1], slots.shape[2]
        H, D = self.n_heads, self.head_dim
        q = self._q(x)  # [B, L, H, D]
        k, v = self._kv(slots)  # [B, P, K, H, D]
        idx = patch_ids.clamp(max=P - 1).view(B, L, 1).expand(B, L, K * H * D)
        kg = torch.gather(k.reshape(B, P, K * H * D), 1, idx).view(B, L, K, H, D)
        vg = torch.gather(v.reshape(B, P, K * H * D), 1, idx).view(B, L, K, H, D)
        s = (q.unsqueeze(2) * kg).sum(-1) * self.scale  # [B, L, K, H]
        w = torch.softmax(s, dim=2)
        out = (w.unsqueeze(-1) * vg).sum(2)  # [B, L, H, D]
        return x + self.o_proj(out.reshape(B, L, H * D))


# ----------------------------------------------------------------------------------------------------- init


def trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


def init_block_weights(module: nn.Module) -> None:
    """Official/transformers init: truncated normal (+-3 std), std = in_features^-0.5 for every linear (so
    ``down_proj`` uses hidden^-0.5), ``dim^-0.5`` for embeddings (caller), norms = 1."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, m.in_features**-0.5)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


__all__ = [
    "RMSNorm", "RotaryEmbedding", "apply_rope", "sdpa", "SelfAttention", "MLP", "TransformerBlock",
    "make_blocks", "CrossAttention", "trunc_normal_", "init_block_weights",
]
