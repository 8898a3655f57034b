"""Hashed n-gram byte embeddings, bit-exact with the reference BLT (BLT_REFERENCE §1.2).

For n-gram size ``n`` and hash function ``f`` (prime ``PRIMES[f % 11]``) the id at position ``i`` is::

    h_i = sum_{k=0}^{n-1} x[i-n+1+k] * prime**k      (int64, two's-complement wraparound)
    id_i = h_i mod vocab                               (Python/floor semantics: 0 <= id_i < vocab)

where ``x`` is the token-id row (bytes + 4, specials included) left-padded with ``n-1`` zeros (BOE), and
``k = 0`` is the *oldest* byte of the window. ``prime**k`` is itself reduced mod 2**64 (wrapped), exactly like
``torch.tensor(prime) ** arange(n)`` in int64. The tables are fused into one ``nn.Embedding(T*vocab, dim)``
(``T = nb_functions * len(sizes)``, function-major, then n-gram size) and table ``j`` is addressed with the
offset ``j * vocab``, like transformers' ``encoder_hash_tok_embedding``. The embedding of a byte is the plain
sum (no normalisation) of its token embedding and its ``T`` hash embeddings.

Documents (our addition): with ``doc_ids`` given, window entries from an earlier document count as 0, i.e.
every document is hashed as if it started the row (left zero padding at its BOS). For a row holding one
document this is exactly the reference; for packed rows the reference lets n-grams cross the EOS, which
would leak the previous document into the next one's first ``max(n)-1`` embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRIMES: tuple[int, ...] = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)

_MASK64 = (1 << 64) - 1


def _to_int64(v: int) -> int:
    """Reinterpret ``v mod 2**64`` as a signed int64 value."""
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


def prime_powers(prime: int, n: int) -> list[int]:
    """``[prime**0, ..., prime**(n-1)]`` wrapped to int64 (what int64 ``pow`` produces)."""
    return [_to_int64(pow(prime, k, 1 << 64)) for k in range(n)]


def rolling_polynomial_hash(
    ids: torch.Tensor, n: int, prime: int = PRIMES[0], doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw int64 hash of the n-gram ending at every position of ``ids[..., L]`` (left zero padding;
    with ``doc_ids[..., L]`` also zero padding at every document start)."""
    ids = ids.to(torch.int64)
    padded = F.pad(ids, (n - 1, 0), value=0)
    windows = padded.unfold(-1, n, 1)  # [..., L, n], oldest first
    if doc_ids is not None and n > 1:
        dw = F.pad(doc_ids, (n - 1, 0), value=-1).unfold(-1, n, 1)
        windows = windows * (dw == doc_ids.unsqueeze(-1))
    powers = torch.tensor(prime_powers(prime, n), dtype=torch.int64, device=ids.device)
    return (windows * powers).sum(-1)  # int64 arithmetic wraps around


def byte_group_hash(
    ids: torch.Tensor, n: int, prime: int = PRIMES[0], vocab: int = 500002, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Hash ids in ``[0, vocab)`` of the n-grams ending at each position (reference ``byte_group_hash_function``)."""
    return torch.remainder(rolling_polynomial_hash(ids, n, prime, doc_ids), vocab)


def hash_ids(
    ids: torch.Tensor, sizes: list[int] | tuple[int, ...], nb_functions: int, vocab: int,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ids into the fused table for every (function, size) pair: ``[..., L, nb_functions*len(sizes)]``.

    Table order is function-major then n-gram size; table ``j`` is offset by ``j * vocab``.
    """
    out = []
    j = 0
    for f in range(nb_functions):
        prime = PRIMES[f % len(PRIMES)]
        for n in sizes:
            out.append(byte_group_hash(ids, n, prime, vocab, doc_ids) + j * vocab)
            j += 1
    if not out:
        return torch.zeros(*ids.shape, 0, dtype=torch.int64, device=ids.device)
    return torch.stack(out, dim=-1)


def hash_embedding_sum(
    ids: torch.Tensor, table: torch.nn.Embedding | torch.Tensor, sizes, nb_functions: int, vocab: int,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over all hash tables of the embeddings of ``ids[B, L]`` -> ``[B, L, dim]`` (one ``embedding_bag``)."""
    weight = table.weight if isinstance(table, torch.nn.Embedding) else table
    hid = hash_ids(ids, sizes, nb_functions, vocab, doc_ids)  # [B, L, T]
    B, L, T = hid.shape
    if T == 0:
        return weight.new_zeros(B, L, weight.shape[1])
    out = F.embedding_bag(hid.reshape(B * L, T), weight, mode="sum")
    return out.view(B, L, -1)
