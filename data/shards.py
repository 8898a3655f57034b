"""Arrow IPC shards: writing them atomically and reading them memory-mapped, zero-copy.

Doc shards (written by ``data.ingest``) live in ``<ingest dir>/{train,val}/shard-NNNNN.arrow``: Arrow IPC
*file* format, uncompressed, columns ``doc_id: string, source: string, data: large_binary``. Uncompressed IPC
files are memory-mapped on read, so the bytes of a document are never copied: ``iter_docs`` yields
``Doc(doc_id, source, data)`` where ``data`` is a read-only ``memoryview`` into the mapped file (it keeps
the mapping alive; ``bytes(doc.data)`` copies, ``np.frombuffer(doc.data, np.uint8)`` does not).

The same writer (``ShardWriter`` / ``write_table_atomic``) serves any stage writing Arrow shards (e.g. the
patch stage's aligned ``entropies`` / ``patch_lengths`` shards): a shard is written to a temporary name,
fsynced and renamed, so a shard file either is complete or does not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Executor, Future, wait
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from blt_pipeline.stage import MANIFEST, atomic_path, read_manifest, sha256_file

DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("data", pa.large_binary())])
SPLITS = ("train", "val")
SHARD_GLOB = "shard-*.arrow"


class ShardCorruptError(ValueError):
    """A shard is missing, truncated, unreadable or does not match its manifest entry (message names it)."""


class Doc(NamedTuple):
    doc_id: str
    source: str
    data: memoryview  # zero-copy view into the memory-mapped shard; bytes(data) for a copy


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


# ----------------------------------------------------------------------------------------------- writing
class _BackgroundHash:
    """sha256 of a file being appended to, computed on an executor thread while the writer goes on.

    Each ``upto(n)`` queues hashing of the bytes written so far; a single-thread executor keeps the order.
    Reads use their own descriptor (``pread``), so they see exactly what the writer wrote.
    """

    def __init__(self, path: Path, executor: Executor):
        self._fd = os.open(path, os.O_RDONLY)
        self._sha = hashlib.sha256()
        self._pos = 0
        self._ex = executor
        self._futures: list[Future] = []

    def _hash(self, end: int) -> None:
        while self._pos < end:
            chunk = os.pread(self._fd, min(4 << 20, end - self._pos), self._pos)
            if not chunk:
                raise OSError(f"short read while hashing at byte {self._pos}")
            self._sha.update(chunk)
            self._pos += len(chunk)

    def upto(self, end: int) -> None:
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
        self._futures.append(self._ex.submit(self._hash, end))

    def finish(self, end: int) -> str:
        self.upto(end)
        try:
            for f in self._futures:
                f.result()
            return self._sha.hexdigest()
        finally:
            self.close()

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        wait(self._futures)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ShardWriter:
    """Stream record batches into one IPC file at ``path``; ``close()`` renames it into place atomically.

    ``close()`` returns ``{"sha256", "rows", "file_bytes"}`` (the sha256 of the file as written). Given an
    ``executor`` (one worker), the hash is computed there batch by batch while writing goes on (hashlib
    releases the GIL), else after closing. On an exception inside ``with`` (or ``abort()``) the temporary
    file is removed and ``path`` is untouched.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, executor: Executor | None = None):
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self._closed = False
        self._hash: _BackgroundHash | None = None
        self._stack = contextlib.ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_path(self.path))
            self._sink = self._stack.enter_context(pa.OSFile(str(tmp), "wb"))  # unbuffered writes
            self._writer = pa.ipc.new_file(self._sink, schema,
                                           options=pa.ipc.IpcWriteOptions(compression=None))
            if executor is not None:
                self._hash = _BackgroundHash(tmp, executor)
        except BaseException:
            self._closed = True
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            raise

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows
        if self._hash is not None:
            self._hash.upto(self._sink.tell())

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows
        if self._hash is not None:
            self._hash.upto(self._sink.tell())

    def close(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError(f"{self.path}: writer already closed")
        self._closed = True
        try:
            self._writer.close()
            size = self._sink.tell()
            digest = self._hash.finish(size) if self._hash is not None else None
        except BaseException:
            self._abort_stack()
            raise
        self._stack.close()  # closes the file, fsyncs and renames it onto self.path
        return {"sha256": digest or sha256_file(self.path), "rows": self.rows, "file_bytes": size}

    def _abort_stack(self) -> None:
        if self._hash is not None:
            self._hash.close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # deletes the temp file

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._writer.close()
            self._abort_stack()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_table_atomic(path: str | Path, table: pa.Table) -> dict[str, Any]:
    """Write ``table`` as an uncompressed Arrow IPC file at ``path`` atomically; returns sha256/rows/bytes."""
    with ShardWriter(path, table.schema) as w:
        w.write_table(table)
        return w.close()


# ----------------------------------------------------------------------------------------------- reading
def list_shards(ingest_dir: str | Path, split: str) -> list[Path]:
    """The shard files of one split, in order (``shard-00000.arrow``, ``shard-00001.arrow``, ...)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted((Path(ingest_dir) / split).glob(SHARD_GLOB))


def read_shard(path: str | Path) -> pa.Table:
    """Memory-map one IPC shard and return it as a table (zero-copy; buffers point into the mapping)."""
    path = Path(path)
    try:
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_file(source).read_all()
    except FileNotFoundError:
        raise ShardCorruptError(f"shard {path} is missing") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        raise ShardCorruptError(f"shard {path} is truncated or corrupt: {err}") from None


def _manifest_or_raise(ingest_dir: Path) -> dict:
    manifest = read_manifest(ingest_dir)
    if manifest is None:
        if (ingest_dir / MANIFEST).exists():
            try:
                json.loads((ingest_dir / MANIFEST).read_text())
            except ValueError:
                raise ShardCorruptError(f"{ingest_dir / MANIFEST} is not valid JSON") from None
            for rel in json.loads((ingest_dir / MANIFEST).read_text()).get("files", {}):
                if not (ingest_dir / rel).exists():
                    raise ShardCorruptError(f"shard {ingest_dir / rel} is missing")
        raise ShardCorruptError(f"{ingest_dir} has no complete manifest (ingest did not finish)")
    return manifest


def verify_shard(path: Path, entry: dict) -> None:
    """Check one shard file against its manifest entry (sha256, rows); raise ShardCorruptError naming it."""
    if not path.exists():
        raise ShardCorruptError(f"shard {path} is missing")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise ShardCorruptError(
            f"shard {path} is corrupt: sha256 {digest[:16]}... does not match the manifest's "
            f"{str(entry.get('sha256'))[:16]}..."
        )
    rows = read_shard(path).num_rows
    if "rows" in entry and rows != entry["rows"]:
        raise ShardCorruptError(f"shard {path} has {rows} rows, the manifest says {entry['rows']}")


def verify_shards(ingest_dir: str | Path) -> dict[str, int]:
    """Verify every shard listed in the manifest (sha256 and row count); returns counts checked.

    Also fails if a split folder holds a shard the manifest does not list.
    """
    ingest_dir = Path(ingest_dir)
    manifest = _manifest_or_raise(ingest_dir)
    files = manifest.get("files", {})
    rows = shards = 0
    for rel, entry in sorted(files.items()):
        verify_shard(ingest_dir / rel, entry)
        shards += 1
        rows += int(entry.get("rows", 0))
    for split in SPLITS:
        for p in list_shards(ingest_dir, split):
            if f"{split}/{p.name}" not in files:
                raise ShardCorruptError(f"shard {p} is not listed in the manifest")
    return {"shards": shards, "rows": rows}


def iter_table_docs(table: pa.Table) -> Iterator[Doc]:
    """Documents of one doc-shard table, zero-copy (``data`` views the table's buffers)."""
    for batch in table.to_batches():
        ids = batch.column("doc_id").to_pylist()
        sources = batch.column("source").to_pylist()
        arr = batch.column("data")
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
        view = memoryview(data_buf).cast("B") if data_buf is not None else memoryview(b"")  # pa exports "b"
        for i, (doc_id, src) in enumerate(zip(ids, sources)):
            yield Doc(doc_id, src, view[int(offsets[i]): int(offsets[i + 1])])


def iter_docs(ingest_dir: str | Path, split: str, verify: bool = False) -> Iterator[Doc]:
    """Every document of a split in shard order; ``verify=True`` checks each shard against the manifest first."""
    ingest_dir = Path(ingest_dir)
    files = _manifest_or_raise(ingest_dir).get("files", {}) if verify else None
    for path in list_shards(ingest_dir, split):
        if files is not None:
            rel = f"{split}/{path.name}"
            if rel not in files:
                raise ShardCorruptError(f"shard {path} is not listed in the manifest")
            verify_shard(path, files[rel])
        yield from iter_table_docs(read_shard(path))


__all__ = [
    "DOC_SCHEMA", "Doc", "ShardCorruptError", "ShardWriter", "iter_docs", "iter_table_docs", "list_shards",
    "read_shard", "shard_name", "verify_shard", "verify_shards", "write_table_atomic",
]
