"""The ingest stage: sources -> Arrow doc shards (``<workdir>/ingest/<key>/{train,val}/shard-NNNNN.arrow``).

``run_ingest(cfg)`` plans the sources (``data.sources``), then runs the stage through
``blt_pipeline.stage.run_stage`` with ``cfg.data`` as the key config and the source fingerprints (paths,
sizes, mtimes; hub id and revision) as ``key_extra``: same config and unchanged sources return the existing
output untouched.

Rules (written down so the output is predictable):

* Documents are streamed source by source in config order; nothing holds the corpus: rows are buffered up to
  ``BATCH_BYTES`` and written as record batches into the open shard of their split.
* Empty documents and documents shorter than ``min_doc_bytes`` are skipped and counted per source. Bytes are
  stored exactly as read (any encoding, NUL, invalid UTF-8).
* ``max_doc_bytes`` cuts longer documents into consecutive parts ``<doc_id>@0``, ``@1``, ... (files are then
  read part by part).
* Limits per source: ``max_docs`` rows, ``max_bytes`` bytes, and a share ``weight / sum(weights)`` of
  ``max_total_bytes``. Rows are taken whole, in order, while they fit; the first row that would exceed a limit
  ends the source (``stopped_by`` in the manifest). An unused share is not passed to other sources.
* Split: a document goes to ``val`` when the first 8 bytes of ``sha256(doc_id)`` (big-endian) / 2**64 is below
  ``val_fraction`` - all parts of a document go to the same split; independent of order and of other
  documents.
* Shards rotate before a row that would take the shard past ``shard_bytes`` (a larger row gets a shard of its
  own). ``shard_multiple``: when a split ends with ``n`` shards and ``n % m = t != 0``, its last ``t`` shards
  are rewritten as ``m`` shards of about equal bytes, so the count becomes the next multiple of ``m`` and every
  shard is non-empty. Cuts fall between documents when the tail has at least ``m`` documents; otherwise
  documents are cut into parts (``<doc_id>@k``, bytes unchanged and in order). A split whose tail holds fewer
  than ``m`` bytes cannot be padded: IngestError. An empty split has 0 shards.
* Every shard is written to a temporary name, fsynced and renamed; ``manifest.json`` is written last by
  ``run_stage``. A killed run leaves no manifest, and the next run rebuilds the directory from scratch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from blt_pipeline.config import IngestConfig, PipelineConfig
from blt_pipeline.stage import compute_key, run_stage
from data.shards import DOC_SCHEMA, SPLITS, ShardWriter, iter_table_docs, read_shard, shard_name
from data.sources import IngestError, Source, SourceStats, build_sources

STAGE = "ingest"
VERSION = "1"
BATCH_BYTES = 8 << 20
BATCH_ROWS = 8192


def split_of(doc_id: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for a document id (a pure function of the id)."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


def _offsets(lengths, dtype) -> pa.Buffer:
    offsets = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(np.fromiter(lengths, dtype=np.int64, count=len(lengths)), out=offsets[1:])
    return pa.py_buffer(offsets)


def _record_batch(ids: list[str], sources: list[str], datas: list) -> pa.RecordBatch:
    """Build the batch from buffers (one copy of the bytes; ``pa.array(list)`` would also import pandas)."""
    cols = []
    for values in (ids, sources):
        enc = [v.encode("utf-8") for v in values]
        cols.append(pa.Array.from_buffers(pa.string(), len(enc),
                                          [None, _offsets([len(e) for e in enc], np.int32),
                                           pa.py_buffer(b"".join(enc))]))
    cols.append(pa.Array.from_buffers(pa.large_binary(), len(datas),
                                      [None, _offsets([len(d) for d in datas], np.int64),
                                       pa.py_buffer(b"".join(datas))]))
    return pa.RecordBatch.from_arrays(cols, schema=DOC_SCHEMA)


class SplitWriter:
    """Rows of one split into rotating shards ``<dir>/shard-NNNNN.arrow``."""

    def __init__(self, directory: Path, split: str, shard_bytes: int, start_index: int = 0,
                 hasher: ThreadPoolExecutor | None = None):
        self.dir = directory
        self.hasher = hasher  # hashes shards on a background thread while they are written
        self.split = split
        self.shard_bytes = shard_bytes
        self.next_index = start_index
        self.shards: list[dict[str, Any]] = []
        self._writer: ShardWriter | None = None
        self._rows = self._bytes = 0
        self._ids: list[str] = []
        self._srcs: list[str] = []
        self._datas: list = []
        self._pending = 0

    def add(self, doc_id: str, source: str, data) -> None:
        n = len(data)
        if self._writer is not None and self._bytes > 0 and self._bytes + n > self.shard_bytes:
            self.finish_shard()
        if self._writer is None:
            self._writer = ShardWriter(self.dir / shard_name(self.next_index), DOC_SCHEMA, self.hasher)
        self._ids.append(doc_id)
        self._srcs.append(source)
        self._datas.append(data)
        self._pending += n
        self._rows += 1
        self._bytes += n
        if self._pending >= BATCH_BYTES or len(self._ids) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            self._writer.write_batch(_record_batch(self._ids, self._srcs, self._datas))
            self._ids, self._srcs, self._datas, self._pending = [], [], [], 0

    def finish_shard(self) -> None:
        if self._writer is None:
            return
        self._flush()
        info = self._writer.close()
        self.shards.append({"path": f"{self.split}/{self._writer.path.name}", "rows": self._rows,
                            "bytes": self._bytes, **info})
        self._writer = None
        self._rows = self._bytes = 0
        self.next_index += 1

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _rebalance_tail(split_dir: Path, split: str, shards: list[dict], multiple: int) -> list[dict]:
    """Rewrite the last ``len(shards) % multiple`` shards as ``multiple`` shards (see the module docstring)."""
    n = len(shards)
    t = n % multiple
    if n == 0 or t == 0:
        return shards
    tail = shards[n - t:]
    tail_bytes = sum(s["bytes"] for s in tail)
    if tail_bytes < multiple:
        raise IngestError(
            f"split {split}: its last {t} shard(s) hold {tail_bytes} bytes, too few for {multiple} non-empty "
            f"shards (shard_multiple={multiple}); lower shard_multiple or add data"
        )
    moved = []
    for i, s in enumerate(tail):
        old = split_dir / Path(s["path"]).name
        tmp = split_dir / f".rebalance-{i:05d}.arrow"
        os.replace(old, tmp)
        moved.append(tmp)
    docs = [d for p in moved for d in iter_table_docs(read_shard(p))]  # zero-copy views into the mappings
    writer = SplitWriter(split_dir, split, shard_bytes=1 << 62, start_index=n - t)
    if len(docs) >= multiple:
        # whole documents; close shard k once its cumulative bytes reach (k+1)/m of the tail, and keep at
        # least one document for every shard still to come
        cum, k = 0, 0
        for i, d in enumerate(docs):
            writer.add(d.doc_id, d.source, d.data)
            cum += len(d.data)
            remaining_docs, remaining_shards = len(docs) - i - 1, multiple - 1 - k
            if k < multiple - 1 and (cum * multiple >= (k + 1) * tail_bytes or remaining_docs == remaining_shards):
                writer.finish_shard()
                k += 1
    else:
        # fewer documents than shards: cut the tail's byte stream at k * B // m, splitting documents into parts
        cuts = [k * tail_bytes // multiple for k in range(multiple + 1)]
        start, k = 0, 0
        for d in docs:
            end = start + len(d.data)
            pieces = []
            pos = start
            while pos < end:
                while cuts[k + 1] <= pos:
                    k += 1
                stop = min(end, cuts[k + 1])
                pieces.append((k, d.data[pos - start: stop - start]))
                pos = stop
            for j, (shard_k, piece) in enumerate(pieces):
                while writer.next_index - (n - t) < shard_k:
                    writer.finish_shard()
                writer.add(d.doc_id if len(pieces) == 1 else f"{d.doc_id}@{j}", d.source, piece)
            start = end
    writer.finish_shard()
    del docs
    for p in moved:
        p.unlink()
    if len(writer.shards) != multiple:  # the invariant the rules above guarantee
        raise RuntimeError(f"rebalance of {split} produced {len(writer.shards)} shards, expected {multiple}")
    return shards[: n - t] + writer.shards


def _budgets(data_cfg: IngestConfig, sources: list[Source]) -> list[int | None]:
    total_w = sum(s.cfg.weight for s in sources)
    out = []
    for s in sources:
        caps = []
        if data_cfg.max_total_bytes is not None:
            caps.append(int(data_cfg.max_total_bytes * s.cfg.weight / total_w))
        out.append(min(caps) if caps else None)
    return out


def build_ingest(out: Path, data_cfg: IngestConfig, sources: list[Source],
                 fingerprints: list[dict]) -> dict[str, Any]:
    """Write the shards of every source into ``out``; return the manifest fields."""
    for split in SPLITS:  # leftovers of a killed run: start from scratch
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
    per_source: dict[str, dict] = {}
    split_docs = {split: 0 for split in SPLITS}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        writers = {split: SplitWriter(out / split, split, data_cfg.shard_bytes, hasher=hasher) for split in SPLITS}
        try:
            for source, budget in zip(sources, _budgets(data_cfg, sources)):
                stats = SourceStats(kind=source.kind, budget_bytes=budget)
                _ingest_source(source, stats, budget, data_cfg, writers)
                per_source[source.label] = stats.as_dict()
            for w in writers.values():
                w.finish_shard()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        written = {split: w.shards for split, w in writers.items()}
    files: dict[str, dict] = {}
    splits: dict[str, dict] = {}
    for split, shards in written.items():
        shards = _rebalance_tail(out / split, split, shards, data_cfg.shard_multiple)
        for s in shards:
            files[s["path"]] = {"sha256": s["sha256"], "rows": s["rows"], "bytes": s["bytes"],
                                "file_bytes": s["file_bytes"]}
        split_docs[split] = sum(s["rows"] for s in shards)
        splits[split] = {"shards": len(shards), "docs": split_docs[split], "bytes": sum(s["bytes"] for s in shards)}
    summary = {
        "docs": sum(v["docs"] for v in splits.values()),
        "bytes": sum(v["bytes"] for v in splits.values()),
        "shards": sum(v["shards"] for v in splits.values()),
        **{f"{split}_{k}": v[k] for split, v in splits.items() for k in ("docs", "bytes", "shards")},
        "sources": len(sources),
        "skipped_empty": sum(s["skipped_empty"] for s in per_source.values()),
        "skipped_bad_records": sum(s["skipped_bad_records"] for s in per_source.values()),
    }
    return {
        "summary": summary,
        "files": files,
        "splits": splits,
        "sources": per_source,
        "fingerprints": fingerprints,
        "schema": DOC_SCHEMA.to_string(),
    }


def _ingest_source(source: Source, stats: SourceStats, budget: int | None, data_cfg: IngestConfig,
                   writers: dict[str, SplitWriter]) -> None:
    cfg = source.cfg
    max_doc, min_doc, frac = data_cfg.max_doc_bytes, data_cfg.min_doc_bytes, data_cfg.val_fraction
    label = source.label
    docs = source.iter_docs(stats)
    try:
        for doc_id, part, data in docs:
            n = len(data)
            if part is None:
                if n == 0:
                    stats.skipped_empty += 1
                    continue
                if n < min_doc:
                    stats.skipped_short += 1
                    continue
            split = split_of(doc_id, frac)
            if part is not None:
                rows = [(f"{doc_id}@{part}", data)]
            elif max_doc is not None and n > max_doc:
                view = memoryview(data)
                rows = [(f"{doc_id}@{k}", view[off: off + max_doc]) for k, off in enumerate(range(0, n, max_doc))]
            else:
                rows = [(doc_id, data)]
            for row_id, row in rows:
                stop = _limit_hit(stats, len(row), cfg.max_docs, cfg.max_bytes, budget)
                if stop:
                    stats.stopped_by = stop
                    return
                writers[split].add(row_id, label, row)
                stats.docs += 1
                stats.bytes += len(row)
    finally:
        docs.close()


def _limit_hit(stats: SourceStats, n: int, max_docs, max_bytes, budget) -> str | None:
    if max_docs is not None and stats.docs + 1 > max_docs:
        return "max_docs"
    if max_bytes is not None and stats.bytes + n > max_bytes:
        return "max_bytes"
    if budget is not None and stats.bytes + n > budget:
        return "max_total_bytes"
    return None


def ingest_fingerprints(data_cfg: IngestConfig) -> tuple[list[Source], list[dict]]:
    sources = build_sources(data_cfg)
    return sources, [s.fingerprint() for s in sources]


def key_for(cfg: PipelineConfig) -> str:
    """The stage key ``run_ingest`` will use (reads source metadata only, no contents)."""
    _, fingerprints = ingest_fingerprints(cfg.data)
    return compute_key(STAGE, cfg.data, None, VERSION, key_extra=fingerprints)


def run_ingest(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or reuse) the ingest stage for ``cfg``; returns the stage result dict (see run_stage)."""
    data_cfg = cfg.data
    sources, fingerprints = ingest_fingerprints(data_cfg)
    return run_stage(
        STAGE, cfg.workdir, data_cfg, None, VERSION,
        lambda out: build_ingest(Path(out), data_cfg, sources, fingerprints),
        key_extra=fingerprints,
    )


__all__ = ["IngestError", "SplitWriter", "build_ingest", "ingest_fingerprints", "key_for", "run_ingest", "split_of"]
