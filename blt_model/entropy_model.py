"""Byte-level causal LM: the entropy model that drives patching, and the byte-level baseline.

``ByteLM``: ``embed_tokens(260) -> blocks -> norm -> lm_head(260)``. Attention is causal, limited to a
sliding window of ``cfg.window`` bytes (``q - k < window``) and split into documents after every EOS (a
document ends with its EOS). RoPE (interleaved pairs, ``cfg.rope_theta``) runs over the row positions and is
not reset at document boundaries. Parameter names equal transformers' ``BltPatcher`` (``layers.i.*``,
``embed_tokens``, ``norm``, ``lm_head``).

Streaming: pass a :class:`ByteLMCache` to ``forward`` to run a long sequence chunk by chunk; every layer keeps
the last ``window`` keys/values (all the window can still see), the absolute position and the running EOS
count, so chunked logits equal the one-pass logits (fp32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import EntropyModelConfig
from .layers import RMSNorm, RotaryEmbedding, init_block_weights, make_blocks, trunc_normal_
from .masks import EOS_ID, attention_mask, document_ids, sequence_mask


@dataclass
class ByteLMCache:
    """Rolling per-layer KV cache of a :class:`ByteLM` (all rows advance together).

    ``layers[i] = (k, v)`` with shape ``[B, H_kv, S, head_dim]`` (``S <= window``), ``key_pos[S]`` the
    absolute positions of the cached keys, ``key_doc[B, S]`` their document ids, ``pos`` the number of tokens
    consumed so far and ``eos_count[B]`` the EOS tokens seen so far per row.
    """

    layers: list = field(default_factory=list)
    key_pos: torch.Tensor | None = None
    key_doc: torch.Tensor | None = None
    pos: int = 0
    eos_count: torch.Tensor | None = None

    def reset(self) -> None:
        self.layers, self.key_pos, self.key_doc, self.pos, self.eos_count = [], None, None, 0, None


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the next-token distribution: ``-sum p log p`` over the last dim (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ByteLM(nn.Module):
    def __init__(self, cfg: EntropyModelConfig):
        super().__init__()
        self.cfg = cfg
        s = cfg.shape
        self.window = cfg.window
        self.embed_tokens = nn.Embedding(cfg.vocab_size, s.dim)
        self.layers = make_blocks(s, cfg.norm_eps)
        self.norm = RMSNorm(s.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(s.dim, cfg.vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(s.head_dim, cfg.rope_theta)
        self.init_weights()

    def init_weights(self) -> None:
        init_block_weights(self)
        trunc_normal_(self.embed_tokens.weight, self.cfg.shape.dim**-0.5)

    def forward(self, ids: torch.Tensor, cache: ByteLMCache | None = None, doc_masks: bool = True) -> torch.Tensor:
        """``ids[B, L]`` -> logits ``[B, L, vocab]`` float32.

        Without ``cache`` the row starts at position 0. With ``cache`` this chunk continues the cached stream
        (positions, window and documents carry over) and the cache is updated in place.
        """
        B, L = ids.shape
        h = self.embed_tokens(ids)
        if cache is None:
            pos = torch.arange(L, device=ids.device)
            cos, sin = self.rotary_emb(pos)
            mask = sequence_mask(ids, self.window, EOS_ID, doc_masks)
            for layer in self.layers:
                h, _ = layer(h, cos, sin, mask)
        else:
            h = self._forward_cached(ids, h, cache, doc_masks)
        return self.lm_head(self.norm(h)).float()

    def _forward_cached(self, ids: torch.Tensor, h: torch.Tensor, cache: ByteLMCache, doc_masks: bool = True):
        B, L = ids.shape
        dev = ids.device
        if cache.eos_count is None:
            cache.eos_count = torch.zeros(B, dtype=torch.int32, device=dev)
        q_pos = torch.arange(cache.pos, cache.pos + L, device=dev)
        q_doc = document_ids(ids, EOS_ID, cache.eos_count)
        if cache.key_pos is None:
            k_pos, k_doc = q_pos, q_doc
        else:
            k_pos = torch.cat((cache.key_pos, q_pos))
            k_doc = torch.cat((cache.key_doc, q_doc), dim=1)
        mask = attention_mask(q_pos, k_pos, self.window, *((q_doc, k_doc) if doc_masks else (None, None)))
        cos, sin = self.rotary_emb(q_pos)
        keep = min(self.window, k_pos.shape[0])
        new_layers = []
        for i, layer in enumerate(self.layers):
            past = cache.layers[i] if cache.layers else None
            h, (k, v) = layer(h, cos, sin, mask, past)
            new_layers.append((k[:, :, -keep:].detach(), v[:, :, -keep:].detach()))
        cache.layers = new_layers
        cache.key_pos = k_pos[-keep:]
        cache.key_doc = k_doc[:, -keep:]
        cache.pos += L
        cache.eos_count = cache.eos_count + (ids == EOS_ID).sum(-1).to(torch.int32)
        return h

    @torch.no_grad()
    def entropies(self, ids: torch.Tensor, chunk_len: int | None = None) -> torch.Tensor:
        """Per-token next-byte entropies (nats) of ``ids[B, L]``; with ``chunk_len`` streamed through a cache."""
        if chunk_len is None or chunk_len >= ids.shape[1]:
            return entropy(self(ids))
        cache = ByteLMCache()
        return torch.cat([entropy(self(c, cache=cache)) for c in ids.split(chunk_len, dim=1)], dim=1)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed_tokens.weight.numel()


EntropyModel = ByteLM

__all__ = ["ByteLM", "EntropyModel", "ByteLMCache", "entropy"]
