"""Stage ``patch``: next-byte entropies of every document and its patch lengths, as shards aligned with the docs.

``run_patch(cfg, ingest, entropy)`` runs through ``blt_pipeline.stage.run_stage`` (stage ``patch``, key config
``cfg.patch``, inputs ``{"ingest": <key>, "train_entropy": <key>}``) and writes

* ``<patch dir>/{train,val}/shard-NNNNN.arrow``: one file per doc shard, same name, aligned row for row:
  ``doc_id: string, entropies: list<float16>, patch_lengths: list<int32>``; ``len(entropies) == len(tokens)
  == len(data) + 2`` and ``sum(patch_lengths) == len(tokens)`` (``include_next_token=False``; the first patch is
  the lone BOS). The schema metadata records the patcher (mode, θ) the lengths were made with.
* ``calibration.json`` (when ``cfg.patch.threshold`` is None in entropy mode): the calibrated θ and its sample.
* the manifest: patcher and θ, patch statistics (mean / median / max bytes per patch, a histogram of patch
  lengths), per-shard rows / sha256, throughput. Summary: ``threshold, mean_bytes_per_patch, bytes_per_s``.

How entropies are computed (``compute_entropies``)
--------------------------------------------------
The trained entropy model (``training.artifacts.load_model(<train_entropy dir>)``) runs in fp32, eval mode,
under ``torch.inference_mode``, **one document per row**, every row starting at position 0 exactly as if the
document were alone. Rows are batched by length (sorted, at most ``cfg.patch.batch_size`` rows, a batch is cut
where padding would pass half of it); the padding goes after the document's EOS, so causality and the model's
document masks keep it from touching the document. A row longer than ``cfg.patch.chunk_len`` is fed in chunks
of ``chunk_len`` through the model's rolling KV cache (``ByteLM.forward(ids, cache=...)``), which keeps the
full sliding window of context across chunk boundaries (the reference instead restarts the context every 8192
bytes). The attention window is the one the model was trained with (``ByteLM.window``). So a document's
entropies do not depend on the batch or the chunking beyond fp32 rounding (``tests/test_patch_stage.py``).
Entropies are stored as float16 and the patch lengths are computed from those float16 values, so re-patching
from stored entropies reproduces the stored lengths exactly.

Threshold
---------
``cfg.patch.threshold`` if set; otherwise θ is calibrated before any shard is written
(``blt_model.patching.calibrate_threshold``, bisection to ``cfg.patch.target_bytes_per_patch``) on a
deterministic sample: the ``cfg.patch.calibration_docs`` train documents with the smallest sha256(doc_id) (val
if train is empty). Bytes per patch is total tokens / total patches (BOS, EOS and the BOS patch included; see
``blt_model.patching``). θ is kept in ``calibration.json`` so a resumed build uses the same θ.

Resume and parallelism
----------------------
Each shard is written atomically (``data.shards.write_table_atomic``). On a re-run of an incomplete stage, a
patch shard that exists and validates (same row count and doc_ids as its doc shard, same patcher metadata) is
kept; a build killed mid-shard leaves only a temporary file, which ``run_stage`` removes. Output bytes are a
function of the inputs only, so a resumed build produces the same files as an uninterrupted one.
Shards are spread over ``cfg.patch.num_workers`` processes (spawned; each loads the model and takes
``cpus // num_workers`` torch threads); ``num_workers=1`` runs in this process with its thread setting.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from blt_model.patching import Patcher, calibrate_threshold
from blt_model.vocab import encode_array
from blt_pipeline.config import PatchConfig, PipelineConfig
from blt_pipeline.stage import atomic_write_json, run_stage, sha256_file, stage_key
from data.shards import SPLITS, iter_table_docs, list_shards, read_shard, write_table_atomic

log = logging.getLogger(__name__)

STAGE = "patch"
VERSION = "1"
CALIBRATION_FILE = "calibration.json"
PATCH_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("entropies", pa.list_(pa.float16())), ("patch_lengths", pa.list_(pa.int32()))]
)
HIST_MAX = 32  # histogram: one bin per patch length 1..32, then one bin ">32"


# ============================================================================================ entropies
def _chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Document indices grouped into batches: longest first, <= batch_size rows, <= 50% padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= batch_size or 2 * lengths[i] < lengths[cur[0]]):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def _rows_entropies(model: torch.nn.Module, rows: list[np.ndarray], chunk_len: int) -> list[np.ndarray]:
    from blt_model.entropy_model import ByteLMCache, entropy

    width = max(r.size for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad (0) after each row's EOS
    for j, r in enumerate(rows):
        ids[j, : r.size] = torch.from_numpy(r)
    if width <= chunk_len:
        ent = entropy(model(ids))
    else:
        cache = ByteLMCache()
        ent = torch.cat([entropy(model(c, cache=cache)) for c in ids.split(chunk_len, dim=1)], dim=1)
    ent = ent.float().numpy()
    return [ent[j, : r.size].copy() for j, r in enumerate(rows)]


def compute_entropies(
    model: torch.nn.Module, docs_tokens: Sequence[np.ndarray], *, batch_size: int = 8, chunk_len: int = 8192
) -> list[np.ndarray]:
    """Per-token next-byte entropies (nats, float32) of each document; see the module docstring.

    ``docs_tokens`` are 1-D token arrays (``blt_model.vocab.encode_array``), one document each; the result is in
    the same order. ``model`` is a ``ByteLM`` (fp32, eval mode; this function does not change it).
    """
    if chunk_len <= 0 or batch_size <= 0:
        raise ValueError("chunk_len and batch_size must be positive")
    out: list[np.ndarray | None] = [None] * len(docs_tokens)
    lengths = [int(t.size) for t in docs_tokens]
    for batch in _chunks(lengths, batch_size):
        nonempty = [i for i in batch if lengths[i] > 0]
        for i in batch:
            if lengths[i] == 0:
                out[i] = np.zeros(0, dtype=np.float32)
        if nonempty:
            for i, e in zip(nonempty, _rows_entropies(model, [np.asarray(docs_tokens[i]) for i in nonempty],
                                                       chunk_len)):
                out[i] = e
    return out  # type: ignore[return-value]


# ============================================================================================ one shard
def _list_array(values: list[np.ndarray], dtype: np.dtype, pa_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([v.size for v in values], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a patch shard would hold more than 2**31 tokens; lower data.shard_bytes")
    flat = np.concatenate(values).astype(dtype, copy=False) if values else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=pa_type))


def _schema_for(patcher: Patcher) -> pa.Schema:
    meta = {"patcher": json.dumps(_patcher_dict(patcher), sort_keys=True)}
    return PATCH_SCHEMA.with_metadata(meta)


def _patcher_dict(patcher: Patcher) -> dict[str, Any]:
    return {
        "mode": patcher.mode, "threshold": patcher.threshold, "monotonic": patcher.monotonic,
        "threshold_add": patcher.threshold_add, "max_patch_length": patcher.max_patch_length,
        "static_size": patcher.static_size, "reference_quirks": patcher.reference_quirks,
    }


def _shard_stats(doc_bytes: int, lengths_col: pa.ListArray) -> dict[str, Any]:
    flat = lengths_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    counts = np.bincount(flat) if flat.size else np.zeros(1, np.int64)
    return {"tokens": int(flat.sum()), "patches": int(flat.size), "bytes": doc_bytes,
            "length_counts": counts.tolist()}


def _validate_existing(out_path: Path, doc_table: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """The existing patch shard if it matches the doc shard and the patcher, else None (and delete it)."""
    if not out_path.exists():
        return None
    try:
        table = read_shard(out_path)
        ok = (
            table.num_rows == doc_table.num_rows
            and table.schema.equals(schema, check_metadata=True)
            and table.column("doc_id").equals(doc_table.column("doc_id"))
        )
    except Exception:  # noqa: BLE001 - unreadable means recompute
        ok = False
    if not ok:
        log.warning("patch shard %s does not match its doc shard or the patcher: recomputing", out_path)
        out_path.unlink(missing_ok=True)
        return None
    return table


def patch_shard(
    model: torch.nn.Module, patcher: Patcher, doc_path: Path, out_path: Path, *, batch_size: int, chunk_len: int
) -> dict[str, Any]:
    """Entropies and patch lengths of one doc shard into ``out_path`` (skipped if already there and valid)."""
    doc_table = read_shard(doc_path)
    docs = list(iter_table_docs(doc_table))
    doc_bytes = sum(len(d.data) for d in docs)
    schema = _schema_for(patcher)
    existing = _validate_existing(out_path, doc_table, schema)
    if existing is not None:
        info = {"sha256": sha256_file(out_path), "rows": existing.num_rows, "file_bytes": out_path.stat().st_size}
        return {**info, **_shard_stats(doc_bytes, existing.column("patch_lengths").combine_chunks()),
                "skipped": True, "seconds": 0.0}
    started = time.perf_counter()
    tokens = [encode_array(d.data) for d in docs]
    ents = compute_entropies(model, tokens, batch_size=batch_size, chunk_len=chunk_len)
    ents16 = [e.astype(np.float16) for e in ents]
    lengths = [patcher.patch_lengths(t, e.astype(np.float32)) for t, e in zip(tokens, ents16)]
    for t, pl in zip(tokens, lengths):
        assert int(pl.sum()) == t.size, "patch lengths must cover the document's tokens"
    lengths_arr = _list_array(lengths, np.int32, pa.int32())
    table = pa.Table.from_arrays(
        [doc_table.column("doc_id").combine_chunks(), _list_array(ents16, np.float16, pa.float16()), lengths_arr],
        schema=schema,
    )
    info = write_table_atomic(out_path, table)
    return {**info, **_shard_stats(doc_bytes, lengths_arr), "skipped": False,
            "seconds": round(time.perf_counter() - started, 4)}


# ============================================================================================ workers
_WORKER: dict[str, Any] = {}


def _load_entropy_model(entropy_dir: str | Path) -> torch.nn.Module:
    from training.artifacts import load_model

    model, _, kind = load_model(entropy_dir)
    if kind not in ("entropy", "baseline"):
        raise ValueError(f"{entropy_dir}: expected an entropy model, found kind {kind!r}")
    return model.float().eval()


def _worker_init(entropy_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["model"] = _load_entropy_model(entropy_dir)


def _worker_run(job: tuple) -> tuple[str, dict]:
    rel, doc_path, out_path, patcher, batch_size, chunk_len = job
    return rel, patch_shard(_WORKER["model"], patcher, Path(doc_path), Path(out_path),
                            batch_size=batch_size, chunk_len=chunk_len)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ============================================================================================ calibration
def _calibration_sample(ingest_dir: Path, n: int) -> list[tuple[str, bytes]]:
    """The ``n`` train docs (val if train is empty) with the smallest sha256(doc_id): (doc_id, data)."""
    for split in SPLITS:
        tables = {path: read_shard(path) for path in list_shards(ingest_dir, split)}
        keyed = (
            (hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest(), doc_id, path, row)
            for path, table in tables.items()
            for row, doc_id in enumerate(table.column("doc_id").to_pylist())
        )
        chosen = heapq.nsmallest(n, keyed)
        if chosen:
            return [(doc_id, tables[path].column("data")[row].as_py()) for _, doc_id, path, row in chosen]
    return []


def _calibrate(out: Path, pcfg: PatchConfig, ingest_dir: Path, model_fn) -> dict[str, Any]:
    path = out / CALIBRATION_FILE
    if path.exists():  # a resumed build keeps the θ its finished shards were made with
        try:
            saved = json.loads(path.read_text())
            if saved.get("target_bytes_per_patch") == pcfg.target_bytes_per_patch and "threshold" in saved:
                return saved
        except ValueError:
            pass
    started = time.perf_counter()
    sample = _calibration_sample(ingest_dir, pcfg.calibration_docs)
    if not sample:
        raise ValueError(f"{ingest_dir}: no documents to calibrate the patch threshold on")
    tokens = [encode_array(d) for _, d in sample]
    ents = compute_entropies(model_fn(), tokens, batch_size=pcfg.batch_size, chunk_len=pcfg.chunk_len)
    ents = [e.astype(np.float16).astype(np.float32) for e in ents]  # decide on the values that get stored
    theta, achieved = calibrate_threshold(
        ents, pcfg.target_bytes_per_patch, monotonic=pcfg.monotonic, threshold_add=pcfg.threshold_add,
        max_patch_length=pcfg.max_patch_length, return_achieved=True,
    )
    result = {
        "threshold": theta, "target_bytes_per_patch": pcfg.target_bytes_per_patch,
        "sample_bytes_per_patch": round(achieved, 6), "docs": len(sample),
        "tokens": int(sum(t.size for t in tokens)),
        "sample": "train docs with the smallest sha256(doc_id) (val if train is empty)",
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(path, result)
    return result


# ============================================================================================ the stage
def _stats(shards: dict[str, dict]) -> dict[str, Any]:
    counts = np.zeros(1, dtype=np.int64)
    for s in shards.values():
        c = np.asarray(s["length_counts"], dtype=np.int64)
        if c.size > counts.size:
            counts = np.pad(counts, (0, c.size - counts.size))
        counts[: c.size] += c
    patches = int(counts.sum())
    tokens = int((counts * np.arange(counts.size)).sum())
    if patches == 0:
        return {"patches": 0, "tokens": 0}
    cum = np.cumsum(counts)
    median = int(np.searchsorted(cum, (patches + 1) // 2))  # lower median of all patch lengths
    hist = {str(k): int(counts[k]) for k in range(1, min(HIST_MAX, counts.size - 1) + 1)}
    if counts.size - 1 > HIST_MAX:
        hist[f">{HIST_MAX}"] = int(counts[HIST_MAX + 1:].sum())
    return {
        "patches": patches, "tokens": tokens, "mean_bytes_per_patch": round(tokens / patches, 6),
        "median_patch_length": median, "max_patch_length": int(np.flatnonzero(counts)[-1]),
        "length_histogram": hist,
    }


def build_patch(out: Path, pcfg: PatchConfig, ingest_dir: Path, entropy_dir: Path) -> dict[str, Any]:
    """``build`` of the patch stage (see the module docstring); returns the manifest fields."""
    out, ingest_dir, entropy_dir = Path(out), Path(ingest_dir), Path(entropy_dir)
    started = time.perf_counter()
    model: list[torch.nn.Module] = []

    def model_fn() -> torch.nn.Module:
        if not model:
            model.append(_load_entropy_model(entropy_dir))
        return model[0]

    calibration = None
    threshold = pcfg.threshold
    if pcfg.mode == "entropy" and threshold is None:
        calibration = _calibrate(out, pcfg, ingest_dir, model_fn)
        threshold = calibration["threshold"]
        log.info("patch: calibrated θ=%.6g on %d docs (%.3f bytes/patch on the sample)", threshold,
                 calibration["docs"], calibration["sample_bytes_per_patch"])
    patcher = Patcher.from_config(pcfg, threshold=threshold)

    jobs = []
    for split in SPLITS:
        for doc_path in list_shards(ingest_dir, split):
            rel = f"{split}/{doc_path.name}"
            jobs.append((rel, str(doc_path), str(out / rel), patcher, pcfg.batch_size, pcfg.chunk_len))
    results: dict[str, dict] = {}
    workers = min(pcfg.num_workers, max(1, len(jobs)))
    compute_started = time.perf_counter()
    if workers <= 1:
        for job in jobs:
            rel, doc_path, out_path = job[:3]
            results[rel] = patch_shard(model_fn(), patcher, Path(doc_path), Path(out_path),
                                       batch_size=pcfg.batch_size, chunk_len=pcfg.chunk_len)
            log.info("patch: %s %s", rel, "kept" if results[rel]["skipped"] else
                     f"{results[rel]['bytes'] / max(results[rel]['seconds'], 1e-9):.0f} bytes/s")
    else:
        threads = max(1, _cpus() // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(str(entropy_dir), threads)) as pool:
            for rel, res in pool.map(_worker_run, jobs):
                results[rel] = res
                log.info("patch: %s %s", rel, "kept" if res["skipped"] else "written")
    compute_seconds = time.perf_counter() - compute_started

    computed = [r for r in results.values() if not r["skipped"]]
    computed_bytes = sum(r["bytes"] for r in computed)
    bytes_per_s = round(computed_bytes / compute_seconds, 1) if computed and compute_seconds > 0 else None
    stats = {split: _stats({k: v for k, v in results.items() if k.startswith(split + "/")}) for split in SPLITS}
    total = _stats(results)
    files = {
        rel: {k: r[k] for k in ("sha256", "rows", "file_bytes", "bytes", "tokens", "patches")}
        for rel, r in sorted(results.items())
    }
    if calibration is not None:
        files[CALIBRATION_FILE] = {"sha256": sha256_file(out / CALIBRATION_FILE)}
    summary = {
        "threshold": threshold, "mode": pcfg.mode,
        "mean_bytes_per_patch": total.get("mean_bytes_per_patch"),
        "bytes_per_s": bytes_per_s, "docs": sum(r["rows"] for r in results.values()),
        "bytes": sum(r["bytes"] for r in results.values()), "patches": total.get("patches", 0),
        "shards": len(results),
    }
    return {
        "summary": summary,
        "files": files,
        "patcher": _patcher_dict(patcher),
        "calibration": calibration,
        "stats": {"all": total, **stats},
        "throughput": {
            "bytes_computed": computed_bytes, "shards_computed": len(computed),
            "shards_kept": len(results) - len(computed), "compute_seconds": round(compute_seconds, 3),
            "bytes_per_s": bytes_per_s, "workers": workers,
            "torch_threads": torch.get_num_threads() if workers <= 1 else max(1, _cpus() // workers),
            "batch_size": pcfg.batch_size, "chunk_len": pcfg.chunk_len,
            "total_seconds": round(time.perf_counter() - started, 3),
        },
        "definitions": {
            "bytes_per_patch": "total tokens / total patches (BOS, EOS and the lone-BOS patch included)",
            "bytes_per_s": "document bytes of the shards computed in this build / their wall time",
        },
    }


def _inputs(ingest: dict, entropy: dict) -> dict[str, str]:
    return {"ingest": ingest["key"], "train_entropy": entropy["key"]}


def key_for(cfg: PipelineConfig, ingest: dict, entropy: dict) -> str:
    """The stage key ``run_patch`` will use (for Prefect's cache), without running anything."""
    return stage_key(STAGE, cfg.patch, _inputs(ingest, entropy), VERSION)


def run_patch(cfg: PipelineConfig, ingest: dict, entropy: dict) -> dict[str, Any]:
    """Run (or reuse, or resume) the patch stage; returns the stage result dict (``run_stage``)."""
    pcfg = cfg.patch
    return run_stage(
        STAGE, cfg.workdir, pcfg, _inputs(ingest, entropy), VERSION,
        lambda out: build_patch(Path(out), pcfg, Path(ingest["dir"]), Path(entropy["dir"])),
    )


__all__ = ["PATCH_SCHEMA", "STAGE", "VERSION", "build_patch", "compute_entropies", "key_for", "patch_shard",
           "run_patch"]
