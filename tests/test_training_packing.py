"""Packing: byte rows and patch rows (fixed patch budget, first patch 1, sums, masks, byte cap), exact resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from blt_model.vocab import BOS_ID, EOS_ID, encode_array
from data.shards import DOC_SCHEMA, shard_name, write_table_atomic
from training.datamodule import PackedBatches
from training.packing import (
    BytePacker,
    DocSource,
    PackingError,
    PatchPacker,
    byte_batch,
    check_patch_batch,
    patch_batch,
)

PATCH_SCHEMA = pa.schema([("doc_id", pa.string()), ("entropies", pa.list_(pa.float16())),
                          ("patch_lengths", pa.list_(pa.int32()))])


def _docs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(32, 127, int(rng.integers(1, 60))).astype(np.uint8)) for _ in range(n)]


def _lengths(n_tokens: int, rng) -> list[int]:
    """Patch lengths of one document: lone BOS, then random patches 1..7 covering the rest."""
    out, left = [1], n_tokens - 1
    while left:
        p = int(min(left, rng.integers(1, 8)))
        out.append(p)
        left -= p
    return out


def write_shards(root, docs_per_shard: list[list[bytes]], split: str = "train", seed: int = 0):
    """Doc shards under ``root/ingest`` and aligned patch shards under ``root/patch``."""
    rng = np.random.default_rng(seed)
    ingest, patch = root / "ingest", root / "patch"
    all_lengths = {}
    for i, docs in enumerate(docs_per_shard):
        ids = [f"{split}-{i}-{j}" for j in range(len(docs))]
        write_table_atomic(ingest / split / shard_name(i), pa.table(
            {"doc_id": ids, "source": ["t"] * len(docs), "data": docs}, schema=DOC_SCHEMA))
        lens = [_lengths(len(d) + 2, rng) for d in docs]
        all_lengths.update(zip(ids, lens))
        ents = [[0.0] * (len(d) + 2) for d in docs]
        write_table_atomic(patch / split / shard_name(i), pa.table(
            {"doc_id": ids, "entropies": ents, "patch_lengths": lens}, schema=PATCH_SCHEMA))
    return ingest, patch, all_lengths


@pytest.fixture
def shards(tmp_path):
    docs = [_docs(7, 1), _docs(5, 2), _docs(9, 3)]
    ingest, patch, lengths = write_shards(tmp_path, docs)
    return ingest, patch, docs, lengths


def test_byte_rows_cover_the_stream_exactly_once(shards):
    ingest, _, docs, _ = shards
    stream = np.concatenate([encode_array(d) for shard in docs for d in shard])
    packer = BytePacker(DocSource(ingest, "train"), seq_len=16, loop=False)
    rows = []
    while (r := packer.next_row()) is not None:
        rows.append(r)
    assert all(r.size == 17 for r in rows[:-1]) and 2 <= rows[-1].size <= 17
    # consecutive rows overlap by one token; targets = every token after the first, once
    targets = np.concatenate([r[1:] for r in rows])
    np.testing.assert_array_equal(targets, stream[1:])
    assert rows[0][0] == BOS_ID and stream[-1] == EOS_ID
    batch = byte_batch(rows[-2:], 16)
    assert batch["x"].shape == (2, 16) and batch["mask"][0].all()
    assert batch["mask"][1].sum() == rows[-1].size - 1 and (batch["y"][1][~batch["mask"][1]] == 0).all()


def test_patch_rows_invariants_and_no_lost_bytes(shards):
    ingest, patch, docs, _ = shards
    stream = np.concatenate([encode_array(d) for shard in docs for d in shard])
    seq_len, max_bytes = 8, 20
    packer = PatchPacker(DocSource(ingest, "train", patch), seq_len, max_bytes, loop=False)
    rows = []
    while (r := packer.next_row()) is not None:
        rows.append(r)
    for toks, lens in rows:
        assert lens[0] == 1, "first patch of every row is one byte"
        assert lens.sum() == toks.size <= max_bytes + 1
        assert lens.size <= seq_len and (lens > 0).all()
    # every row but the last uses its whole patch budget or its whole byte budget
    for toks, lens in rows[:-1]:
        assert lens.size == seq_len or toks.size == max_bytes + 1
    # rows are consecutive slices of the stream: no byte lost or repeated
    np.testing.assert_array_equal(np.concatenate([t for t, _ in rows]), stream)
    # some rows hit the byte cap (trailing zero patches), some use the whole patch budget
    assert any(t.size == max_bytes + 1 for t, _ in rows) and any(l.size == seq_len for _, l in rows)

    batch = patch_batch(rows[:4], seq_len, max_bytes, pad_multiple=8)
    check_patch_batch(batch, seq_len, max_bytes)
    pl, x, mask = batch["patch_lengths"], batch["x"], batch["mask"]
    assert pl.shape == (4, seq_len), "fixed patch budget"
    assert (pl[:, 0] == 1).all() and (pl.sum(1) == x.shape[1] + 1).all()
    assert x.shape[1] <= max_bytes
    for i, (toks, _) in enumerate(rows[:4]):
        assert mask[i].sum() == toks.size - 1
        assert (x[i, toks.size - 1:] == 0).all()


def test_patch_rows_keep_patch_boundaries_inside_rows(shards):
    """Away from row edges, the stored patch boundaries are kept exactly."""
    ingest, patch, docs, lengths = shards
    packer = PatchPacker(DocSource(ingest, "train", patch), seq_len=1000, max_bytes=10_000, loop=False)
    toks, lens = packer.next_row()  # everything in one row
    expected = np.concatenate([lengths[f"train-{i}-{j}"] for i, s in enumerate(docs) for j in range(len(s))])
    np.testing.assert_array_equal(lens[: expected.size], expected[: lens.size])


def test_invariant_violations_are_caught():
    good = {"x": np.zeros((1, 4), np.int64), "mask": np.ones((1, 4), bool),
            "patch_lengths": np.array([[1, 2, 2, 0]])}
    check_patch_batch(good, 4, 8)
    with pytest.raises(PackingError, match="first patch"):
        check_patch_batch({**good, "patch_lengths": np.array([[2, 1, 2, 0]])}, 4, 8)
    with pytest.raises(PackingError, match="sum"):
        check_patch_batch({**good, "patch_lengths": np.array([[1, 2, 1, 0]])}, 4, 8)
    with pytest.raises(PackingError, match="budget"):
        check_patch_batch(good, 5, 8)
    with pytest.raises(PackingError, match="cap"):
        check_patch_batch(good, 4, 3)


def test_misaligned_patch_shards_fail_clearly(tmp_path):
    ingest, patch, _ = write_shards(tmp_path, [_docs(3)])
    write_table_atomic(patch / "train" / shard_name(0), pa.table(
        {"doc_id": ["x", "y", "z"], "entropies": [[0.0]] * 3, "patch_lengths": [[1]] * 3}, schema=PATCH_SCHEMA))
    with pytest.raises(PackingError, match="aligned"):
        PatchPacker(DocSource(ingest, "train", patch), 4, 16).next_row()


@pytest.mark.parametrize("mode", ["bytes", "patches"])
def test_resume_from_state_gives_the_same_batches(shards, mode):
    ingest, patch, _, _ = shards
    kw = dict(mode=mode, ingest_dir=str(ingest), patch_dir=str(patch), split="train", seq_len=8,
              batch_size=3, max_bytes=24, shuffle=True, seed=5, loop=True)
    straight = list(zip(range(40), PackedBatches(**kw)))
    state = straight[4][1]["state"]
    resumed = list(zip(range(35), PackedBatches(**kw, state=state)))
    for (_, a), (_, b) in zip(straight[5:], resumed):
        for k in ("x", "y", "mask") + (("patch_lengths",) if mode == "patches" else ()):
            assert torch.equal(a[k], b[k])
        assert a["state"] == b["state"]
    # looping over epochs reshuffles: epoch 1's order differs from epoch 0's
    assert straight[-1][1]["state"]["epoch"] >= 1


def test_ranks_and_workers_split_global_batches(shards):
    ingest, _, _, _ = shards
    kw = dict(mode="bytes", ingest_dir=str(ingest), split="train", seq_len=8, batch_size=2, shuffle=False,
              loop=True, max_batches=4)
    single = list(PackedBatches(**{**kw, "batch_size": 4}))
    r0 = list(PackedBatches(**kw, world_size=2, rank=0))
    r1 = list(PackedBatches(**kw, world_size=2, rank=1))
    for s, a, b in zip(single, r0, r1):
        assert torch.equal(s["x"], torch.cat([a["x"], b["x"]]))
        assert s["global_bytes"] == a["global_bytes"] == b["global_bytes"]
    loader = torch.utils.data.DataLoader(PackedBatches(**kw, world_size=2, rank=1), batch_size=None,
                                         num_workers=2)
    for a, b in zip(r1, loader):
        assert torch.equal(a["x"], b["x"])
