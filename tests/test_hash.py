"""Hash n-gram embeddings: bit-exact with the reference (BLT_REFERENCE §1.2)."""

from __future__ import annotations

import torch

from blt_model.hashing import (
    PRIMES,
    byte_group_hash,
    hash_embedding_sum,
    hash_ids,
    prime_powers,
    rolling_polynomial_hash,
)

HELLO = torch.tensor([[1, 76, 105, 112, 112, 115]])  # BOS + "Hello" (+4 offset)


def test_reference_vectors():
    assert byte_group_hash(HELLO, 3, PRIMES[0], 500002).tolist() == [[443987, 124875, 393970, 386145, 358223, 190185]]
    assert byte_group_hash(HELLO, 4, PRIMES[0], 500002).tolist() == [[437197, 433869, 117936, 254402, 246577, 30240]]
    assert byte_group_hash(HELLO, 8, PRIMES[0], 500002).tolist() == [[172383, 205585, 456240, 129346, 299568, 322649]]


def _python_hash(ids: list[int], n: int, prime: int, vocab: int) -> list[int]:
    """Independent big-int implementation: sum window[k]*prime^k mod 2^64 as int64, then floor mod."""
    pad = [0] * (n - 1) + ids
    out = []
    for i in range(len(ids)):
        h = sum(pad[i + k] * prime**k for k in range(n)) % (1 << 64)
        if h >= 1 << 63:
            h -= 1 << 64
        out.append(h % vocab)
    return out


def test_wraparound_matches_bigint_all_primes():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 260, (1, 40), generator=g)
    for prime in PRIMES:
        for n in (1, 2, 3, 5, 8):
            got = byte_group_hash(ids, n, prime, 4099)[0].tolist()
            assert got == _python_hash(ids[0].tolist(), n, prime, 4099), (prime, n)
            assert all(0 <= v < 4099 for v in got)
    # int64 wraparound really happens (and is the wrapped value, not a clamp)
    assert prime_powers(PRIMES[6], 3)[2] == ((PRIMES[6] ** 2) % (1 << 64)) - (1 << 64) * (((PRIMES[6] ** 2) % (1 << 64)) >= (1 << 63))
    assert rolling_polynomial_hash(torch.tensor([[259] * 8]), 8, PRIMES[6]).dtype == torch.int64


def test_matches_transformers_hash():
    from transformers.models.blt.modeling_blt import byte_group_hash_function

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 260, (3, 64), generator=g)
    for prime in PRIMES[:4]:
        for n in (3, 6, 8):
            assert torch.equal(byte_group_hash(ids, n, prime, 500002), byte_group_hash_function(ids, n, prime, 500002))


def test_fused_table_offsets_and_sum():
    sizes, nf, vocab, dim = [3, 4], 2, 97, 8
    ids = torch.randint(4, 260, (2, 11), generator=torch.Generator().manual_seed(2))
    hid = hash_ids(ids, sizes, nf, vocab)
    assert hid.shape == (2, 11, 4)
    # function-major, then size; table j offset by j*vocab
    assert torch.equal(hid[..., 0], byte_group_hash(ids, 3, PRIMES[0], vocab))
    assert torch.equal(hid[..., 1], byte_group_hash(ids, 4, PRIMES[0], vocab) + vocab)
    assert torch.equal(hid[..., 2], byte_group_hash(ids, 3, PRIMES[1], vocab) + 2 * vocab)
    assert torch.equal(hid[..., 3], byte_group_hash(ids, 4, PRIMES[1], vocab) + 3 * vocab)
    table = torch.nn.Embedding(4 * vocab, dim)
    ref = sum(table(hid[..., j]) for j in range(4))
    torch.testing.assert_close(hash_embedding_sum(ids, table, sizes, nf, vocab), ref, atol=1e-6, rtol=0)


def test_document_reset():
    from blt_model.masks import document_ids

    d1 = torch.tensor([1, 50, 60, 2])
    row = torch.cat((d1, HELLO[0])).unsqueeze(0)
    docs = document_ids(row)
    for n in (3, 4, 8):
        got = byte_group_hash(row, n, PRIMES[0], 500002, docs)
        assert torch.equal(got[:, 4:], byte_group_hash(HELLO, n, PRIMES[0], 500002))  # as if the row started there
        assert torch.equal(got[:, :4], byte_group_hash(d1[None], n, PRIMES[0], 500002))
        assert not torch.equal(byte_group_hash(row, n, PRIMES[0], 500002)[:, 4:], got[:, 4:])  # reference leaks
