"""Byte Latent Transformer in pure torch (BLT_REFERENCE §1).

Parameter names map one to one onto transformers' ``BltForCausalLM`` (5.24): our ``X`` is their
``model.X`` (``local_encoder.*``, ``global_transformer.*``, ``local_decoder.*``,
``encoder_hash_tok_embedding.weight``) and ``lm_head.weight`` is their ``lm_head.weight``; the patcher is
a separate :class:`~blt_model.entropy_model.ByteLM` (``model.patcher.*``). See ``blt_model.convert``.

Patch lengths (``forward``'s ``patch_lengths[B, P]``)
-----------------------------------------------------
* Every row starts with a patch of length 1 (the lone BOS / first byte).
* Trailing zeros are padding (zero-length patches at the end of a row own no byte and are never read).
* The non-zero lengths of a row sum to ``L + 1`` (official ``include_next_token=True``: the last patch also
  covers the "next byte" slot ``L``) or to ``L`` (transformers). A row summing to ``L`` is read as if slot
  ``L`` continued its last patch (+1 on its last non-zero length). Rows of a batch may mix the two forms.
* Encoder: byte ``t`` is pooled into the patch ``j`` that contains it. Decoder: byte ``t`` reads the global
  output ``o_{d(t)}`` of the latest patch whose bytes are all ``<= t`` (ids from ``lengths[:, 1:]``, §1.7):
  its own patch if ``t`` is the patch's last byte, else the previous one. At the last position ``L-1``
  this depends on slot ``L``: with ``L + 1`` lengths ending ``[..., 1]`` the slot starts a new patch and
  ``L-1`` reads its own patch; otherwise (including every ``L``-sum row) it reads the previous patch.
  Difference from transformers: a trailing *zero* after an ``L``-sum row is padding here, while
  transformers treats it as a zero-length next patch (so ``L-1`` would read its own patch).
* Patch boundaries must be prefix-stable (decided from bytes ``< start``), otherwise future bytes leak.

Documents: an EOS (id 2) ends a document. Local self-attention (encoder, decoder) is causal, windowed and
split into documents; global attention is causal over patches and split after every patch that contains an
EOS; hash n-grams do not reach back into the previous document. With patch boundaries at document
boundaries, a document's logits do not depend on what precedes it in the row. Pass ``doc_masks=False`` to
disable all three (transformers' behaviour; identical anyway for rows without an inner EOS).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BltConfig
from .hashing import hash_embedding_sum
from .layers import CrossAttention, RMSNorm, RotaryEmbedding, init_block_weights, make_blocks, trunc_normal_
from .masks import (
    EOS_ID,
    decoder_patch_ids,
    document_ids,
    normalize_patch_lengths,
    patch_ids_from_lengths,
    patch_mask,
    sequence_mask,
)


def patch_ids(patch_lengths: torch.Tensor, seq_len: int, check: bool = True):
    """``(encoder_ids, decoder_ids, lengths)`` for ``patch_lengths[B, P]`` in either convention (see module doc).

    ``encoder_ids[B, L]``: patch containing byte t. ``decoder_ids[B, L]``: patch d(t) whose global output byte t
    reads. ``lengths``: the int64 ``L + 1`` form.
    """
    lengths = normalize_patch_lengths(patch_lengths, seq_len, check=check)
    return patch_ids_from_lengths(lengths, seq_len), decoder_patch_ids(lengths, seq_len), lengths


class LocalEncoder(nn.Module):
    def __init__(self, cfg: BltConfig):
        super().__init__()
        s = cfg.encoder
        self.k = cfg.cross_attn_k
        self.all_layers = cfg.cross_attn_all_layers_encoder
        self.embed_tokens = nn.Embedding(cfg.vocab_size, s.dim)
        self.layers = make_blocks(s, cfg.norm_eps)
        self.patch_embedding_projection = nn.Linear(s.dim, s.dim * cfg.cross_attn_k, bias=False)
        n_ca = s.n_layers if self.all_layers else 1
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(s.dim, s.n_heads, s.n_kv_heads, cfg.norm_eps) for _ in range(n_ca)
        )
        self.rotary_emb = RotaryEmbedding(s.head_dim, cfg.rope_theta)

    def forward(self, h, mask, pids, num_patches):
        """``h[B, L, dim]`` embeddings -> ``(byte_states[B, L, dim], patch_embeds[B, P, k*dim])``.

        Patch queries are initialised once, by max-pooling the byte states of the layer the first
        cross-attention follows (empty patches -> 0) and projecting to k slots (official behaviour).
        """
        B, L, dim = h.shape
        cos, sin = self.rotary_emb(torch.arange(L, device=h.device))
        slots = None
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            h, _ = layer(h, cos, sin, mask)
            if self.all_layers or i == n - 1:
                if slots is None:
                    pooled = h.new_zeros(B, num_patches + 1, dim).scatter_reduce(
                        1, pids.unsqueeze(-1).expand(B, L, dim), h, reduce="amax", include_self=False
                    )[:, :num_patches]
                    slots = self.patch_embedding_projection(pooled).view(B, num_patches, self.k, dim)
                ca = self.cross_attn_layers[i if self.all_layers else 0]
                slots = slots + ca.patches_from_bytes(slots, h, pids)  # double residual (official/HF)
        if slots is None:  # no encoder layers
            raise ValueError("the local encoder needs at least one layer")
        return h, slots.reshape(B, num_patches, self.k * dim)


class GlobalTransformer(nn.Module):
    def __init__(self, cfg: BltConfig):
        super().__init__()
        s = cfg.global_
        self.layers = make_blocks(s, cfg.norm_eps)
        if cfg.global_input_projection:
            self.token_embedding_projection = nn.Linear(cfg.encoder.dim * cfg.cross_attn_k, s.dim, bias=False)
        else:
            self.token_embedding_projection = None
        self.rotary_emb = RotaryEmbedding(s.head_dim, cfg.rope_theta)

    def forward(self, x, mask):
        """``x[B, P, k*h_E]`` -> ``[B, P, h_G]`` (RoPE over patch index, no final norm)."""
        if self.token_embedding_projection is not None:
            x = self.token_embedding_projection(x)
        cos, sin = self.rotary_emb(torch.arange(x.shape[1], device=x.device))
        for layer in self.layers:
            x, _ = layer(x, cos, sin, mask)
        return x


class LocalDecoder(nn.Module):
    def __init__(self, cfg: BltConfig):
        super().__init__()
        s = cfg.decoder
        self.k = cfg.cross_attn_k
        self.all_layers = cfg.cross_attn_all_layers_decoder
        self.layers = make_blocks(s, cfg.norm_eps)
        self.patch_embedding_projection = nn.Linear(cfg.global_.dim, s.dim * cfg.cross_attn_k, bias=False)
        self.norm = RMSNorm(s.dim, cfg.norm_eps)
        n_ca = s.n_layers if self.all_layers else 1
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(s.dim, s.n_heads, s.n_kv_heads, cfg.norm_eps) for _ in range(n_ca)
        )
        self.rotary_emb = RotaryEmbedding(s.head_dim, cfg.rope_theta)

    def forward(self, h, global_out, mask, dec_pids):
        """``h[B, L, dim]`` encoder byte states, ``global_out[B, P, h_G]`` -> normed states ``[B, L, dim]``."""
        B, L, dim = h.shape
        slots = self.patch_embedding_projection(global_out).view(B, global_out.shape[1], self.k, dim)
        cos, sin = self.rotary_emb(torch.arange(L, device=h.device))
        for i, layer in enumerate(self.layers):
            if i == 0 or self.all_layers:
                h = h + self.cross_attn_layers[i].bytes_from_patches(h, slots, dec_pids)  # double residual
            h, _ = layer(h, cos, sin, mask)
        return self.norm(h)


class BLT(nn.Module):
    """Byte Latent Transformer. ``forward(input_ids[B, L], patch_lengths[B, P]) -> logits[B, L, 260]`` fp32."""

    def __init__(self, cfg: BltConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder.n_layers < 1:
            raise ValueError("the local encoder needs at least one layer")
        self.local_encoder = LocalEncoder(cfg)
        self.global_transformer = GlobalTransformer(cfg)
        self.local_decoder = LocalDecoder(cfg)
        n_tables = cfg.hash_functions * len(cfg.hash_sizes)
        self.encoder_hash_tok_embedding = nn.Embedding(max(n_tables, 1) * cfg.hash_vocab, cfg.encoder.dim)
        self.lm_head = nn.Linear(cfg.decoder.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Official init (truncated normal, +-3 std): linears in_features^-0.5, embeddings h_E^-0.5, norms 1."""
        init_block_weights(self)
        std = self.cfg.encoder.dim**-0.5
        trunc_normal_(self.local_encoder.embed_tokens.weight, std)
        trunc_normal_(self.encoder_hash_tok_embedding.weight, std)

    def embed(self, input_ids: torch.Tensor, doc_masks: bool = True) -> torch.Tensor:
        """Byte embedding plus the plain sum of all hash n-gram embeddings ``[B, L, h_E]``.

        With ``doc_masks`` n-gram windows do not reach into the previous document (see ``blt_model.hashing``).
        """
        cfg = self.cfg
        h = self.local_encoder.embed_tokens(input_ids)
        if cfg.hash_functions and cfg.hash_sizes:
            docs = None
            if doc_masks and bool((input_ids[:, :-1] == EOS_ID).any()):
                docs = document_ids(input_ids, EOS_ID)
            h = h + hash_embedding_sum(
                input_ids, self.encoder_hash_tok_embedding, cfg.hash_sizes, cfg.hash_functions, cfg.hash_vocab, docs
            )
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        patch_lengths: torch.Tensor,
        doc_masks: bool = True,
        check: bool = True,
    ) -> torch.Tensor:
        """Logits ``[B, L, vocab]`` (float32) for ``input_ids[B, L]`` and ``patch_lengths[B, P]``.

        See the module docstring for the patch-length convention (first patch 1; sum L or L+1; trailing
        zeros = padding) and for document handling (EOS = 2 ends a document unless ``doc_masks=False``).
        """
        B, L = input_ids.shape
        enc_ids, dec_ids, lengths = patch_ids(patch_lengths, L, check=check)
        P = lengths.shape[1]
        local_mask = sequence_mask(input_ids, self.cfg.window, EOS_ID, doc_masks)
        h = self.embed(input_ids, doc_masks)
        h, patches = self.local_encoder(h, local_mask, enc_ids, P)
        g = self.global_transformer(patches, patch_mask(input_ids, enc_ids, P, EOS_ID, doc_masks))
        h = self.local_decoder(h, g, local_mask, dec_ids)
        return self.lm_head(h).float()

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.encoder_hash_tok_embedding.weight.numel() + self.local_encoder.embed_tokens.weight.numel()
        return n


__all__ = ["BLT", "LocalEncoder", "GlobalTransformer", "LocalDecoder", "patch_ids"]
