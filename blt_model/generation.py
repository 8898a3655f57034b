"""Incremental BLT inference (pure torch, no I/O): generate bytes without re-running the prefix.

The reference generator (``generate_nocache``, BLT_REFERENCE §4.5) re-runs the entropy model, the patcher
and the whole BLT over the full prefix for every new byte: O(n^2). :class:`BLTDecoderState` keeps, instead:

* the **entropy model**'s rolling K/V (last ``window`` positions) and the entropies so far; the patcher decides, after every new token, whether the *next* position opens a patch
  (``include_next_token=True`` semantics; every patcher of ``blt_model.patching`` is prefix-stable);
* the **local encoder**'s per-layer rolling KV caches (last ``window`` keys) and the byte states of the
  current, still open patch (the states of the layers its cross-attentions read);
* the **global transformer**'s K/V of every *completed* patch. The decoder only ever reads global outputs of
  complete patches (byte t reads the latest patch whose bytes are all ``<= t``, and whether t ends its patch
  is known once ``H[t]`` is), so a patch is pooled (max-pool + encoder cross-attention over its own bytes)
  and run through the global transformer exactly once, when it closes;
* the **local decoder**'s per-layer rolling KV caches and, per decoder cross-attention layer, the keys/values
  of the slots ``patch_embedding_projection(o_j)`` of every completed patch.

So each new byte costs one token through the entropy model, the encoder and the decoder, plus one global
step per patch. Logits equal the full recompute (``full_recompute_logits``) up to fp32 rounding.

Limits: one sequence (batch 1); no EOS inside the fed tokens (generation stops at EOS), so document masks
never split anything; ``max_seqlen`` is not enforced (RoPE extrapolates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .entropy_model import entropy
from .hashing import PRIMES, hash_embedding_sum, prime_powers
from .layers import apply_rope
from .masks import attention_mask
from .model import BLT
from .vocab import BOE_ID, BOS_ID, BPE_ID, EOS_ID, OFFSET

_NEVER = (BOE_ID, BOS_ID, BPE_ID)  # ids a generator never emits
_MASK64 = (1 << 64) - 1


class _KV:
    """Preallocated K/V buffer of one attention layer (no per-step ``torch.cat``).

    Holds the keys/values of the last ``n`` positions (contiguous, newest last). With a ``window`` only the
    last ``window - 1`` entries are kept when the buffer is compacted; without one it grows by doubling.
    """

    __slots__ = ("k", "v", "n", "window")

    def __init__(self, window: int | None):
        self.k = self.v = None
        self.n = 0
        self.window = window

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v [1, H, L, D]`` (post-RoPE)."""
        L = k.shape[2]
        if self.k is None:
            cap = max(2 * (self.window or 64), L + (self.window or 64))
            shape = (k.shape[0], k.shape[1], cap, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        cap = self.k.shape[2]
        if self.n + L > cap:
            if self.window is not None:
                keep = min(self.n, self.window - 1)
                if keep + L > cap:  # a long chunk: make room for it
                    self._grow(keep + L + self.window, keep)
                else:
                    self.k[:, :, :keep] = self.k[:, :, self.n - keep: self.n].clone()
                    self.v[:, :, :keep] = self.v[:, :, self.n - keep: self.n].clone()
                self.n = keep
            else:
                self._grow(max(2 * cap, self.n + L), self.n)
        self.k[:, :, self.n: self.n + L] = k
        self.v[:, :, self.n: self.n + L] = v
        self.n += L

    def _grow(self, cap: int, keep: int) -> None:
        shape = (self.k.shape[0], self.k.shape[1], cap, self.k.shape[3])
        k2, v2 = self.k.new_empty(shape), self.v.new_empty(shape)
        k2[:, :, :keep] = self.k[:, :, self.n - keep: self.n]
        v2[:, :, :keep] = self.v[:, :, self.n - keep: self.n]
        self.k, self.v = k2, v2

    def last(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = min(m, self.n)
        return self.k[:, :, self.n - m: self.n], self.v[:, :, self.n - m: self.n]


def _rotations(rotary, q_pos: torch.Tensor) -> torch.Tensor:
    """``cos + i sin`` of a ``layers.RotaryEmbedding`` at ``q_pos`` (complex64 ``[L, D/2]``)."""
    cos, sin = rotary(q_pos)
    return torch.complex(cos.float(), sin.float())


def _rope_key(rotary) -> tuple:
    hd, th = getattr(rotary, "head_dim", None), getattr(rotary, "theta", None)
    return (hd, th) if hd is not None and th is not None else (id(rotary),)


class _Norm:
    """``layers.RMSNorm`` as one fused op (``F.rms_norm``, same formula) for fp32 activations."""

    __slots__ = ("mod", "shape")

    def __init__(self, mod):
        self.mod = mod
        self.shape = (mod.weight.shape[0],)

    def __call__(self, x):
        if x.dtype != torch.float32:
            return self.mod(x)
        return F.rms_norm(x, self.shape, self.mod.weight, self.mod.eps)


class _FusedBlock:
    """One ``layers.TransformerBlock`` stepped incrementally, with its q/k/v and gate/up weights fused once.

    Same math as ``TransformerBlock.forward`` (pre-norm, RoPE on q/k, SDPA, SwiGLU); the module's own norms and
    ``apply_rope`` are used, only the weight concatenation and the K/V bookkeeping differ.
    """

    __slots__ = ("blk", "w_qkv", "w_gu", "hq", "hk", "H", "Hkv", "D", "hidden", "n1", "n2")

    def __init__(self, blk):
        a, mlp = blk.self_attn, blk.mlp
        self.blk = blk
        self.w_qkv = torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), 0).detach()
        self.w_gu = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight), 0).detach()
        self.H, self.Hkv, self.D = a.n_heads, a.n_kv_heads, a.head_dim
        self.hq, self.hk = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self.hidden = mlp.hidden
        self.n1, self.n2 = _Norm(blk.input_layernorm), _Norm(blk.post_attention_layernorm)

    def __call__(self, x, rot, q_pos, kv: _KV, window: int | None):
        """``rot[L, D/2]`` complex64: the RoPE rotations of the new positions (see ``_rotations``)."""
        B, L, _ = x.shape
        blk = self.blk
        qkv = F.linear(self.n1(x), self.w_qkv)
        if x.dtype == torch.float32:  # RoPE on q and k at once, as one complex multiply (apply_rope's math)
            qk = torch.view_as_complex(qkv[..., : self.hq + self.hk].unflatten(-1, (self.H + self.Hkv, -1, 2)))
            qk = torch.view_as_real(qk * rot[:, None, :]).flatten(-2)
            q, k = qk[:, :, : self.H].transpose(1, 2), qk[:, :, self.H:].transpose(1, 2)
        else:
            cos, sin = torch.view_as_real(rot).unbind(-1)
            q = apply_rope(qkv[..., : self.hq].unflatten(-1, (self.H, self.D)), cos, sin).transpose(1, 2)
            k = apply_rope(qkv[..., self.hq: self.hq + self.hk].unflatten(-1, (self.Hkv, self.D)), cos,
                           sin).transpose(1, 2)
        v = qkv[..., self.hq + self.hk:].unflatten(-1, (self.Hkv, self.D)).transpose(1, 2)
        kv.append(k, v)
        span = kv.n if window is None else min(kv.n, L + window - 1)  # every key a new query can see
        keys, values = kv.last(span)
        gqa = self.H != self.Hkv
        if L == 1:  # every key in the span is visible
            o = F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        else:
            p1 = int(q_pos[-1]) + 1
            k_pos = torch.arange(p1 - span, p1, device=x.device)
            mask = attention_mask(q_pos, k_pos, window)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        h = x + blk.self_attn.o_proj(o.transpose(1, 2).reshape(B, L, self.hq))
        g, u = F.linear(self.n2(h), self.w_gu).split((self.hidden, self.hidden), dim=-1)
        return h + blk.mlp.down_proj(F.silu(g) * u)


@dataclass
class _Stats:
    tokens: int = 0
    patches: int = 0
    seconds: dict = field(default_factory=lambda: {"entropy": 0.0, "encoder": 0.0, "global": 0.0, "decoder": 0.0})


class BLTDecoderState:
    """Incremental state of one sequence ``[BOS] + bytes...`` for a :class:`~blt_model.model.BLT`.

    ``patcher`` is a ``blt_model.patching.Patcher`` (entropy mode needs ``entropy_model``). ``extend(ids)``
    appends tokens and returns the logits of the last one (or of all, ``all_logits=True``); ``patch_lengths``
    gives the patches so far in the ``include_next_token=True`` form (sum ``n + 1``).
    """

    def __init__(self, model: BLT, patcher, entropy_model: torch.nn.Module | None = None, profile: bool = False):
        if getattr(patcher, "needs_entropies", False) and entropy_model is None:
            raise ValueError("entropy patching needs the entropy model")
        self.model = model
        self.cfg = model.cfg
        self.patcher = patcher
        self.entropy_model = entropy_model if getattr(patcher, "needs_entropies", False) else None
        self.tokens: list[int] = []
        self.entropies: list[float] = []
        self.starts: list[bool] = []  # starts[s]: position s opens a patch (known up to len(tokens))
        self.n_patches_done = 0  # completed patches (pooled + global ran)
        cfg = self.cfg
        w = cfg.window
        self.enc_blocks = [_FusedBlock(b) for b in model.local_encoder.layers]
        self.dec_blocks = [_FusedBlock(b) for b in model.local_decoder.layers]
        self.glob_blocks = [_FusedBlock(b) for b in model.global_transformer.layers]
        self.enc_caches = [_KV(w) for _ in self.enc_blocks]
        self.dec_caches = [_KV(w) for _ in self.dec_blocks]
        self.glob_caches = [_KV(None) for _ in self.glob_blocks]
        em = self.entropy_model
        self.ent_blocks = [_FusedBlock(b) for b in em.layers] if em is not None else []
        self.ent_caches = [_KV(em.window) for _ in self.ent_blocks] if em is not None else []
        self.enc_all = model.local_encoder.all_layers
        self.open_states: list[list[torch.Tensor]] = [[] for _ in model.local_encoder.layers]  # per layer chunks
        n_ca = len(model.local_decoder.cross_attn_layers)
        self.dec_k: list[torch.Tensor | None] = [None] * n_ca  # per decoder cross-attn: [1, P_done, k, H, D]
        self.dec_v: list[torch.Tensor | None] = [None] * n_ca
        self.max_hash = max(cfg.hash_sizes) if cfg.hash_sizes and cfg.hash_functions else 1
        self._pow_cache: dict = {}
        self.profile = profile
        self.stats = _Stats()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # ----------------------------------------------------------------------------------- helpers
    def _tick(self, name: str, t0: float) -> float:
        if self.profile:
            t1 = time.perf_counter()
            self.stats.seconds[name] += t1 - t0
            return t1
        return t0

    @property
    def n(self) -> int:
        return len(self.tokens)

    def patch_lengths(self) -> np.ndarray:
        """Lengths of the patches so far, covering positions ``0..n`` (include_next_token form, sum n+1)."""
        s = np.flatnonzero(np.asarray(self.starts, dtype=bool))
        return np.diff(s, append=len(self.starts)).astype(np.int32)

    def _decide_starts(self) -> None:
        """Extend ``starts`` to cover positions ``0..n`` (the next position included)."""
        toks = np.asarray(self.tokens, dtype=np.int64)
        ent = np.asarray(self.entropies, dtype=np.float32) if self.entropy_model is not None else None
        lengths = self.patcher.patch_lengths(tokens=toks, entropies=ent, include_next_token=True)
        mask = np.zeros(int(np.sum(lengths)), dtype=bool)
        mask[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
        old = len(self.starts)
        if old and not np.array_equal(mask[:old], np.asarray(self.starts, dtype=bool)):
            raise RuntimeError("the patcher is not prefix-stable: earlier patch boundaries changed")
        self.starts = mask.tolist()

    # ----------------------------------------------------------------------------------- one chunk
    @torch.inference_mode()
    def extend(self, ids, all_logits: bool = False) -> torch.Tensor:
        """Append tokens (a list or 1-D tensor; the first token of a sequence should be BOS).

        Returns logits ``[vocab]`` of the last new token (``[L, vocab]`` with ``all_logits``), fp32.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        L = ids.shape[1]
        if L == 0:
            raise ValueError("extend needs at least one token")
        if bool((ids[:, :-1] == EOS_ID).any()) or (self.tokens and self.tokens[-1] == EOS_ID):
            raise ValueError("tokens after an EOS: start a new state for a new document")
        n0 = self.n
        m = self.model
        t0 = time.perf_counter()
        # 1. entropy model (rolling cache) and patch decisions for positions n0+1 .. n0+L
        self.tokens.extend(ids[0].tolist())
        q_pos = torch.arange(n0, n0 + L, device=self.device)
        if self.entropy_model is not None:
            self.entropies.extend(entropy(self._entropy_logits(ids, q_pos))[0].tolist())
        self._decide_starts()
        t0 = self._tick("entropy", t0)

        # 2. local encoder on the new tokens
        h = m.local_encoder.embed_tokens(ids)
        cfg = self.cfg
        if cfg.hash_functions and cfg.hash_sizes:
            if L == 1:  # one new byte: its hash ids in Python ints (same int64 arithmetic), one embedding_bag
                hid = torch.as_tensor([self._hash_ids_last()], dtype=torch.long, device=self.device)
                h = h + F.embedding_bag(hid, m.encoder_hash_tok_embedding.weight, mode="sum").view(1, 1, -1)
            else:
                lo = max(0, n0 - self.max_hash + 1)
                tail = torch.as_tensor(self.tokens[lo:], dtype=torch.long, device=self.device).view(1, -1)
                hh = hash_embedding_sum(tail, m.encoder_hash_tok_embedding, cfg.hash_sizes, cfg.hash_functions,
                                        cfg.hash_vocab)
                h = h + hh[:, -L:]
        enc = m.local_encoder
        rot = _rotations(enc.rotary_emb, q_pos)
        layer_out = []
        for blk, cache in zip(self.enc_blocks, self.enc_caches):
            h = blk(h, rot, q_pos, cache, cfg.window)
            layer_out.append(h)
        t0 = self._tick("encoder", t0)

        # 3. close the patches that end inside this chunk: pool, encoder cross-attention, global transformer
        starts = self.starts
        closed_ends = [t for t in range(n0, n0 + L) if starts[t + 1]]  # t is the last byte of its patch
        if closed_ends:
            self._close_patches(n0, L, closed_ends, layer_out)
        else:
            self._buffer(layer_out, 0, L)
        t0 = self._tick("global", t0)

        # 4. local decoder: byte t reads the slots of d(t) = patch index of t+1, minus 1
        cum = np.cumsum(np.asarray(starts[: n0 + L + 1], dtype=np.int64)) - 1  # patch index of each position
        d_np = cum[n0 + 1: n0 + L + 1] - 1
        d = torch.as_tensor(d_np, dtype=torch.long, device=self.device)
        dec = m.local_decoder
        if _rope_key(dec.rotary_emb) != _rope_key(enc.rotary_emb):
            rot = _rotations(dec.rotary_emb, q_pos)  # else: the encoder's rotations serve the decoder too
        x = h
        for i, (blk, cache) in enumerate(zip(self.dec_blocks, self.dec_caches)):
            if i == 0 or dec.all_layers:
                x = x + self._decoder_cross(i, x, d)  # double residual, as LocalDecoder.forward
            x = blk(x, rot, q_pos, cache, cfg.window)
        x = x if all_logits else x[:, -1:]
        logits = m.lm_head(dec.norm(x)).float()[0]
        self._tick("decoder", t0)
        self.stats.tokens += L
        return logits if all_logits else logits[-1]

    def _hash_ids_last(self) -> list[int]:
        """Fused-table hash ids of the n-grams ending at the last token (``hashing.hash_ids`` semantics:
        left zero padding, oldest byte * prime**0, int64 wraparound, floor modulo)."""
        cfg = self.cfg
        out, j = [], 0
        for f in range(cfg.hash_functions):
            prime = PRIMES[f % len(PRIMES)]
            for n in cfg.hash_sizes:
                win = self.tokens[-n:]
                win = [0] * (n - len(win)) + win
                hv = sum(x * p for x, p in zip(win, self._powers(prime, n))) & _MASK64
                if hv >= 1 << 63:
                    hv -= 1 << 64
                out.append(hv % cfg.hash_vocab + j * cfg.hash_vocab)
                j += 1
        return out

    def _powers(self, prime: int, n: int) -> list[int]:
        key = (prime, n)
        if key not in self._pow_cache:
            self._pow_cache[key] = prime_powers(prime, n)
        return self._pow_cache[key]

    def _decoder_cross(self, i: int, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``CrossAttention.bytes_from_patches`` with the patch slots' K/V computed once per patch (at close).

        Byte t (query) attends to the k slots of patch ``d[t]``; returns ``x + o_proj(attn)``.
        """
        ca = self.model.local_decoder.cross_attn_layers[i]
        B, L, _ = x.shape
        q = ca._q(x)  # [1, L, H, D]
        kg = self.dec_k[i][0, d]  # [L, K, H, D]
        vg = self.dec_v[i][0, d]
        s = (q[0].unsqueeze(1) * kg).sum(-1) * ca.scale  # [L, K, H]
        w = torch.softmax(s, dim=1)
        out = (w.unsqueeze(-1) * vg).sum(1)  # [L, H, D]
        return x + ca.o_proj(out.reshape(1, L, ca.n_heads * ca.head_dim))

    def _entropy_logits(self, ids: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """The entropy model (``ByteLM``) on the new tokens against its own rolling K/V (sliding window)."""
        em = self.entropy_model
        h = em.embed_tokens(ids)
        rot = _rotations(em.rotary_emb, q_pos)
        for blk, cache in zip(self.ent_blocks, self.ent_caches):
            h = blk(h, rot, q_pos, cache, em.window)
        return em.lm_head(em.norm(h)).float()

    def _buffer(self, layer_out, a: int, b: int) -> None:
        """Keep the states of chunk positions ``[a, b)`` (still in an open patch) for later pooling."""
        if b <= a:
            return
        for i, h in enumerate(layer_out):
            if self.enc_all or i == len(layer_out) - 1:
                self.open_states[i].append(h[:, a:b])

    def _close_patches(self, n0: int, L: int, closed_ends: list[int], layer_out) -> None:
        m = self.model
        enc = m.local_encoder
        dim = self.cfg.encoder.dim
        n_layers = len(enc.layers)
        used = [i for i in range(n_layers) if self.enc_all or i == n_layers - 1]
        last_end = closed_ends[-1]
        cut = last_end + 1 - n0  # chunk positions [0, cut) belong to patches closed now
        # byte states of the closed patches: open buffer + chunk prefix
        states = {}
        for i in used:
            parts = self.open_states[i] + [layer_out[i][:, :cut]]
            states[i] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            self.open_states[i] = []
        self._buffer(layer_out, cut, L)
        # local patch ids (0..m-1) of the bytes of the closed patches
        first_pos = last_end + 1 - states[used[0]].shape[1]
        st = np.asarray(self.starts[first_pos: last_end + 1], dtype=np.int64)
        pid_local = np.cumsum(st) - 1
        if pid_local[0] != 0:
            raise RuntimeError("internal error: the open patch buffer does not start at a patch start")
        n_new = int(pid_local[-1]) + 1
        pids = torch.as_tensor(pid_local, dtype=torch.long, device=self.device).view(1, -1)
        Lp = pids.shape[1]
        # encoder pooling, as LocalEncoder.forward: max-pool the first used layer's states, project, CA per layer
        slots = None
        for i in used:
            hs = states[i]
            if slots is None:
                pooled = hs.new_zeros(1, n_new + 1, dim).scatter_reduce(
                    1, pids.unsqueeze(-1).expand(1, Lp, dim), hs, reduce="amax", include_self=False
                )[:, :n_new]
                slots = enc.patch_embedding_projection(pooled).view(1, n_new, enc.k, dim)
            ca = enc.cross_attn_layers[i if self.enc_all else 0]
            slots = slots + ca.patches_from_bytes(slots, hs, pids)
        x = slots.reshape(1, n_new, enc.k * dim)
        # global transformer over the new patches, with the K/V of all earlier patches
        g = m.global_transformer
        if g.token_embedding_projection is not None:
            x = g.token_embedding_projection(x)
        p0 = self.n_patches_done
        q_pos = torch.arange(p0, p0 + n_new, device=self.device)
        rot = _rotations(g.rotary_emb, q_pos)
        for blk, cache in zip(self.glob_blocks, self.glob_caches):
            x = blk(x, rot, q_pos, cache, None)
        dec = m.local_decoder
        new_slots = dec.patch_embedding_projection(x).view(1, n_new, dec.k, self.cfg.decoder.dim)
        for i, ca in enumerate(dec.cross_attn_layers):  # decoder cross-attention K/V of the new patches
            k, v = ca._kv(new_slots)  # [1, n_new, K, H, D]
            self.dec_k[i] = k if self.dec_k[i] is None else torch.cat((self.dec_k[i], k), dim=1)
            self.dec_v[i] = v if self.dec_v[i] is None else torch.cat((self.dec_v[i], v), dim=1)
        self.n_patches_done += n_new
        self.stats.patches += n_new


# --------------------------------------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None, allow_eos: bool = True) -> int:
    """Next token id from ``logits[vocab]``: greedy at temperature 0, else temperature + nucleus sampling.

    BOE, BOS and BPE are never produced; EOS only with ``allow_eos`` (it ends the generation).
    """
    logits = logits.float().clone()
    logits[list(_NEVER) + ([] if allow_eos else [EOS_ID])] = float("-inf")
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cum = torch.cumsum(sp, 0)
        keep = cum - sp < top_p  # smallest prefix whose mass reaches top_p (the top token always kept)
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(0, si, sp)
    probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------------------------- full recompute
@torch.inference_mode()
def full_recompute_logits(model: BLT, patcher, entropy_model, tokens) -> torch.Tensor:
    """Logits ``[vocab]`` after ``tokens`` by re-running everything on the whole prefix (the reference way)."""
    ids = torch.as_tensor(tokens, dtype=torch.long, device=next(model.parameters()).device).view(1, -1)
    ent = None
    if getattr(patcher, "needs_entropies", False):
        ent = entropy(entropy_model(ids))[0].cpu().numpy()
    lengths = patcher.patch_lengths(tokens=ids[0].cpu().numpy(), entropies=ent, include_next_token=True)
    pl = torch.as_tensor(np.asarray(lengths, dtype=np.int64), device=ids.device).view(1, -1)
    return model(ids, pl)[0, -1].float()


@dataclass
class Generation:
    """Result of :func:`generate`: the new bytes and how they were made."""

    prompt: bytes
    data: bytes
    tokens: list[int]
    stopped_at_eos: bool
    seconds: float
    patch_lengths: list[int] | None = None

    @property
    def bytes_per_s(self) -> float:
        return len(self.data) / self.seconds if self.seconds > 0 else float("inf")

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@torch.inference_mode()
def generate(model: BLT, patcher, entropy_model=None, prompt: bytes | str = b"", max_bytes: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
             stop_at_eos: bool = True, profile: bool = False) -> Generation:
    """Generate up to ``max_bytes`` bytes after ``[BOS] + prompt``.

    ``use_cache=True``: :class:`BLTDecoderState` (one token per step through every model). ``False``: the
    reference's full recompute of entropies, patches and the BLT over the whole prefix at every step.
    ``stop_at_eos=False`` never samples EOS, so exactly ``max_bytes`` bytes come out.
    """
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    tokens = [BOS_ID] + [b + OFFSET for b in prompt]
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    eos = False
    t0 = time.perf_counter()
    state = BLTDecoderState(model, patcher, entropy_model, profile=profile) if use_cache else None
    logits = state.extend(tokens) if state is not None else full_recompute_logits(model, patcher, entropy_model, tokens)
    for i in range(max_bytes):
        tok = sample_next(logits, temperature, top_p, gen, allow_eos=stop_at_eos)
        if tok == EOS_ID and stop_at_eos:
            eos = True
            break
        out.append(tok)
        tokens.append(tok)
        if i == max_bytes - 1:
            break
        if state is not None:
            logits = state.extend([tok])
        else:
            logits = full_recompute_logits(model, patcher, entropy_model, tokens)
    secs = time.perf_counter() - t0
    data = bytes(t - OFFSET for t in out if t >= OFFSET)
    pls = state.patch_lengths().tolist() if state is not None else None
    g = Generation(prompt, data, out, eos, secs, pls)
    if state is not None and profile:
        g.profile = state.stats  # type: ignore[attr-defined]
    return g


__all__ = ["BLTDecoderState", "Generation", "full_recompute_logits", "generate", "sample_next"]
