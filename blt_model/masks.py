"""Attention masks and patch-id helpers (BLT_REFERENCE §1.7, §1.9).

One mask builder, :func:`attention_mask`, serves every self-attention in the project (entropy model, local
encoder, local decoder, global transformer, baseline): causal, optional sliding window (``q - k < window``,
the query itself included, like xformers ``make_local_attention`` and transformers' sliding window) and
document blocks (a key is visible only if it has the query's document id). Masks are boolean, True = attend.

Patch-length convention (see :func:`normalize_patch_lengths`): rows of ``patch_lengths[B, P]`` start with a
1-byte patch (the lone BOS), trailing zeros are padding, and the non-zero lengths sum either to ``L``
(transformers) or to ``L + 1`` (official ``include_next_token=True``: the last patch also covers the
"next byte" slot ``L``). Everything internal uses the ``L + 1`` form.
"""

from __future__ import annotations

import torch

EOS_ID = 2


def document_ids(ids: torch.Tensor, eos_id: int = EOS_ID, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Document index of every token of ``ids[B, L]``: the number of EOS tokens strictly before it.

    A document therefore ends *with* its EOS (EOS belongs to the document it closes). ``offset[B]`` adds the
    EOS count of earlier chunks (streaming).
    """
    is_eos = (ids == eos_id).to(torch.int32)
    doc = torch.cumsum(is_eos, dim=-1, dtype=torch.int32) - is_eos
    if offset is not None:
        doc = doc + offset.to(doc.dtype).unsqueeze(-1)
    return doc


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean self-attention mask ``[B or 1, 1, Lq, Lk]`` (True = may attend).

    ``q_pos[Lq]``/``k_pos[Lk]`` are absolute positions (shared by all rows); ``key <= query`` (causal) and,
    with ``window``, ``query - key < window``. ``q_doc[B, Lq]``/``k_doc[B, Lk]`` (optional) restrict
    attention to keys of the same document.
    """
    diff = q_pos.view(-1, 1) - k_pos.view(1, -1)
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    allowed = allowed.view(1, 1, *allowed.shape)
    if q_doc is not None and k_doc is not None:
        allowed = allowed & (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2)).unsqueeze(1)
    return allowed


def sequence_mask(
    ids: torch.Tensor, window: int | None, eos_id: int = EOS_ID, doc_masks: bool = True
) -> torch.Tensor | None:
    """Mask for a full row of bytes ``ids[B, L]`` (positions 0..L-1). Returns None when plain causal suffices.

    The caller passes ``None`` on to SDPA with ``is_causal=True`` (see ``layers.sdpa``).
    """
    L = ids.shape[-1]
    has_docs = doc_masks and bool((ids[:, :-1] == eos_id).any())  # an EOS at the very end splits nothing
    if not has_docs and (window is None or window >= L):
        return None
    pos = torch.arange(L, device=ids.device)
    doc = document_ids(ids, eos_id) if has_docs else None
    return attention_mask(pos, pos, window, doc, doc)


# ---------------------------------------------------------------------------------------------- patches


def normalize_patch_lengths(patch_lengths: torch.Tensor, seq_len: int, check: bool = True) -> torch.Tensor:
    """Return int64 lengths ``[B, P]`` in the official ``L + 1`` convention.

    Accepted input, per row: first length 1; non-zero lengths summing to ``seq_len`` (transformers) or to
    ``seq_len + 1`` (official ``include_next_token``); trailing zeros are padding. A row that sums to
    ``seq_len`` gets +1 on its last non-zero patch, i.e. the "next byte" slot ``L`` is taken to continue the
    last patch, so the last byte ``L-1`` reads the previous patch (what transformers computes when no
    zero-length patch follows). To make byte ``L-1`` read its own patch, pass ``L + 1`` lengths ending in a
    patch of length 1 (the next-byte slot alone).
    """
    lengths = patch_lengths.to(torch.int64)
    if lengths.dim() != 2:
        raise ValueError(f"patch_lengths must be [B, P], got {tuple(lengths.shape)}")
    sums = lengths.sum(-1)
    if check:
        if bool((lengths < 0).any()):
            raise ValueError("patch_lengths must be >= 0")
        if bool((lengths[:, 0] != 1).any()):
            raise ValueError("the first patch of every row must have length 1 (the lone BOS)")
        ok = (sums == seq_len) | (sums == seq_len + 1)
        if not bool(ok.all()):
            raise ValueError(
                f"patch lengths must sum to L={seq_len} (transformers) or L+1={seq_len + 1} "
                f"(include_next_token), got {sums.tolist()}"
            )
    short = sums == seq_len
    if bool(short.any()):
        P = lengths.shape[1]
        idx = torch.arange(P, device=lengths.device)
        last_nz = torch.where(lengths > 0, idx, torch.zeros_like(idx)).amax(-1)  # [B]
        bump = (idx.unsqueeze(0) == last_nz.unsqueeze(-1)) & short.unsqueeze(-1)
        lengths = lengths + bump.to(lengths.dtype)
    return lengths


def patch_ids_from_lengths(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Patch index of every byte position ``0..seq_len-1`` -> ``[B, seq_len]`` int64.

    Byte ``t`` belongs to patch ``j`` when ``start_j <= t < start_j + len_j``; zero-length patches own no
    byte. Positions at or past the total length get the id ``P`` (out of range), so pass lengths that cover
    ``seq_len``.
    """
    ends = torch.cumsum(patch_lengths.to(torch.int64), dim=-1).contiguous()
    pos = torch.arange(seq_len, device=patch_lengths.device, dtype=torch.int64)
    pos = pos.unsqueeze(0).expand(ends.shape[0], -1).contiguous()
    return torch.searchsorted(ends, pos, right=True)


def decoder_patch_ids(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Global patch each byte's decoder cross-attends to: ``d(t)`` from ``lengths[:, 1:]`` (§1.7).

    ``patch_lengths`` must be in the ``L + 1`` form (:func:`normalize_patch_lengths`). ``d(t)`` is the latest
    patch whose bytes are all ``<= t``: the patch of ``t`` if ``t`` is its last byte, else the one before.
    Example: lengths ``[1,3,2,4,1]``, L=10 -> encoder ids ``[0 1 1 1 2 2 3 3 3 3]``, decoder ids
    ``[0 0 0 1 1 2 2 2 2 3]``.
    """
    return patch_ids_from_lengths(patch_lengths[:, 1:], seq_len)


def patch_document_ids(ids: torch.Tensor, patch_ids: torch.Tensor, num_patches: int, eos_id: int = EOS_ID):
    """Document index of every patch ``[B, P]``: a patch that contains an EOS ends its document block.

    Returns None when no patch (except possibly the last) contains an EOS.
    """
    is_eos = (ids == eos_id).to(torch.int32)
    if not bool(is_eos.any()):
        return None
    has = torch.zeros(ids.shape[0], num_patches + 1, dtype=torch.int32, device=ids.device)
    has.scatter_add_(1, patch_ids.clamp(max=num_patches), is_eos)
    has = (has[:, :num_patches] > 0).to(torch.int32)
    return torch.cumsum(has, dim=-1, dtype=torch.int32) - has


def patch_mask(ids: torch.Tensor, patch_ids: torch.Tensor, num_patches: int, eos_id: int = EOS_ID, doc_masks=True):
    """Block-causal mask over patches (global transformer), or None for plain causal."""
    if not doc_masks:
        return None
    pdoc = patch_document_ids(ids, patch_ids, num_patches, eos_id)
    if pdoc is None or bool((pdoc == pdoc[:, :1]).all()):
        return None
    pos = torch.arange(num_patches, device=ids.device)
    return attention_mask(pos, pos, None, pdoc, pdoc)


__all__ = [
    "EOS_ID", "document_ids", "attention_mask", "sequence_mask", "normalize_patch_lengths",
    "patch_ids_from_lengths", "decoder_patch_ids", "patch_document_ids", "patch_mask",
]
