"""data.shards: atomic IPC writes, memory-mapped zero-copy reads, verification against the manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from blt_pipeline.config import PipelineConfig
from blt_pipeline.stage import read_manifest, sha256_file
from data.ingest import run_ingest
from data.shards import (
    DOC_SCHEMA,
    ShardCorruptError,
    ShardWriter,
    iter_docs,
    iter_table_docs,
    list_shards,
    read_shard,
    verify_shards,
    write_table_atomic,
)


def _table(n: int = 5) -> pa.Table:
    return pa.table(
        {"doc_id": [f"d{i}" for i in range(n)], "source": ["s"] * n,
         "data": pa.array([bytes([i]) * (i + 1) for i in range(n)], pa.large_binary())},
        schema=DOC_SCHEMA,
    )


def test_write_table_atomic_roundtrip(tmp_path):
    path = tmp_path / "sub" / "shard-00000.arrow"
    info = write_table_atomic(path, _table())
    assert info["rows"] == 5
    assert info["sha256"] == sha256_file(path)
    assert info["file_bytes"] == path.stat().st_size
    assert sorted(os.listdir(path.parent)) == ["shard-00000.arrow"]  # no temp files left
    t = read_shard(path)
    assert t.schema == DOC_SCHEMA
    assert t.column("data").to_pylist() == [bytes([i]) * (i + 1) for i in range(5)]
    # uncompressed IPC *file* format (magic ARROW1 at both ends)
    raw = path.read_bytes()
    assert raw[:6] == b"ARROW1" and raw[-6:] == b"ARROW1"


def test_read_is_memory_mapped_zero_copy(tmp_path):
    path = tmp_path / "big.arrow"
    blob = os.urandom(8 << 20)
    write_table_atomic(path, pa.table({"doc_id": ["a"], "source": ["s"],
                                       "data": pa.array([blob], pa.large_binary())}, schema=DOC_SCHEMA))
    before = pa.total_allocated_bytes()
    table = read_shard(path)
    docs = list(iter_table_docs(table))
    assert pa.total_allocated_bytes() - before < 1 << 20  # nothing like the 8 MB payload was copied
    assert isinstance(docs[0].data, memoryview) and docs[0].data.readonly
    assert docs[0].data == blob
    assert np.frombuffer(docs[0].data, np.uint8).size == len(blob)


def test_shard_writer_abort_leaves_nothing(tmp_path):
    path = tmp_path / "shard-00000.arrow"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path, DOC_SCHEMA) as w:
            w.write_table(_table())
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _ingest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02d}.txt").write_bytes(os.urandom(3000 + i))
    cfg = PipelineConfig.model_validate({"workdir": str(tmp_path / "wd"), "data": {
        "sources": [{"kind": "files", "paths": [str(src)]}], "shard_bytes": 10_000, "val_fraction": 0.25}})
    return run_ingest(cfg)


def test_list_and_verify(tmp_path):
    res = _ingest(tmp_path)
    d = res["dir"]
    train = list_shards(d, "train")
    assert [p.name for p in train] == [f"shard-{i:05d}.arrow" for i in range(len(train))]
    checked = verify_shards(d)
    manifest = json.loads(open(res["manifest"]).read())
    assert checked == {"shards": len(manifest["files"]), "rows": 12}
    assert sum(1 for _ in iter_docs(d, "train", verify=True)) + sum(1 for _ in iter_docs(d, "val")) == 12
    with pytest.raises(ValueError, match="split"):
        list_shards(d, "test")


def test_corrupt_shard_is_named(tmp_path):
    res = _ingest(tmp_path)
    victim = list_shards(res["dir"], "train")[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip one payload byte: still a readable IPC file, wrong checksum
    victim.write_bytes(bytes(raw))
    with pytest.raises(ShardCorruptError, match=victim.name) as err:
        verify_shards(res["dir"])
    assert "sha256" in str(err.value)
    with pytest.raises(ShardCorruptError, match=victim.name):
        list(iter_docs(res["dir"], "train", verify=True))


def test_truncated_shard_is_named(tmp_path):
    res = _ingest(tmp_path)
    victim = list_shards(res["dir"], "train")[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ShardCorruptError, match=victim.name):
        read_shard(victim)
    with pytest.raises(ShardCorruptError, match=victim.name):
        verify_shards(res["dir"])


def test_missing_shard_and_incomplete_dir(tmp_path):
    res = _ingest(tmp_path)
    victim = list_shards(res["dir"], "train")[0]
    victim.unlink()
    assert read_manifest(res["dir"]) is None  # the stage contract sees it as incomplete
    with pytest.raises(ShardCorruptError, match=victim.name):
        verify_shards(res["dir"])
    with pytest.raises(ShardCorruptError, match="missing"):
        read_shard(victim)
