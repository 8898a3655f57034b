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
``cfg.patch.threshold`` if set (one pass: entropies and patch lengths shard by shard). Otherwise (entropy mode)
the build has two phases so no document goes through the model twice: (1) the entropies of every shard are
written to ``_entropies/{train,val}/shard-NNNNN.arrow`` (``doc_id, entropies``); (2) θ is calibrated
(``blt_model.patching.calibrate_threshold``, bisection to ``cfg.patch.target_bytes_per_patch``) on the stored
entropies of a deterministic sample -- the ``cfg.patch.calibration_docs`` train documents with the smallest
sha256(doc_id) (val if train is empty) -- and kept in ``calibration.json``; then the patch shards are written
from the stored entropies and ``_entropies/`` is removed. Bytes per patch is total tokens / total patches (BOS,
EOS and the BOS patch included; see ``blt_model.patching``).

Resume and parallelism
----------------------
Each shard is written atomically (``data.shards.write_table_atomic``). On a re-run of an incomplete stage, a
patch shard (or phase-1 entropy shard) that exists and validates (same row count and doc_ids as its doc shard,
same patcher metadata) is kept, and a saved ``calibration.json`` is reused; a build killed mid-shard leaves only
a temporary file, which ``run_stage`` removes. On the same hardware and thread count the output bytes are a
function of the inputs only, so a resumed build produces the same files as an uninterrupted one.
Shards are spread over ``cfg.patch.num_workers`` processes (spawned; each loads the model and takes
``cpus // num_workers`` torch threads); ``num_workers=1`` runs in this process with its thread setting. The
model runs on the GPU when CUDA is available (still fp32), else on the CPU.

Cost: attention is computed densely over ``chunk_len + window`` keys per query, so on CPUs a ``chunk_len`` of
one to two windows is fastest (``bench/results/patch.md``); large chunks pay on GPUs.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import multiprocessing as mp
import os
import shutil
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
ENTROPY_SCHEMA = pa.schema([("doc_id", pa.string()), ("entropies", pa.list_(pa.float16()))])
ENTROPY_DIR = "_entropies"  # phase-1 files of a calibrating build; removed once every patch shard is written
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
    ids = ids.to(next(model.parameters()).device)
    if width <= chunk_len:
        ent = entropy(model(ids))
    else:
        cache = ByteLMCache()
        ent = torch.cat([entropy(model(c, cache=cache)) for c in ids.split(chunk_len, dim=1)], dim=1)
    ent = ent.float().cpu().numpy()
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


def _patcher_dict(patcher: Patcher) -> dict[str, Any]:
    return {
        "mode": patcher.mode, "threshold": patcher.threshold, "monotonic": patcher.monotonic,
        "threshold_add": patcher.threshold_add, "max_patch_length": patcher.max_patch_length,
        "static_size": patcher.static_size, "reference_quirks": patcher.reference_quirks,
    }


def _schema_for(patcher: Patcher) -> pa.Schema:
    return PATCH_SCHEMA.with_metadata({"patcher": json.dumps(_patcher_dict(patcher), sort_keys=True)})


def _shard_stats(lengths_col: pa.ListArray) -> dict[str, Any]:
    flat = lengths_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    counts = np.bincount(flat) if flat.size else np.zeros(1, np.int64)
    return {"tokens": int(flat.sum()), "patches": int(flat.size), "length_counts": counts.tolist()}


def _valid_existing(path: Path, doc_ids: pa.ChunkedArray, schema: pa.Schema) -> pa.Table | None:
    """The table at ``path`` if it exists, reads, has ``schema`` (metadata too) and the doc shard's doc_ids."""
    if not path.exists():
        return None
    try:
        table = read_shard(path)
        if (table.num_rows == len(doc_ids) and table.schema.equals(schema, check_metadata=True)
                and table.column("doc_id").equals(doc_ids)):
            return table
    except Exception:  # noqa: BLE001 - unreadable means recompute
        pass
    log.warning("%s does not match its doc shard or the patcher: recomputing", path)
    path.unlink(missing_ok=True)
    return None


def _shard_entropies(model_fn, doc_table: pa.Table, ent_path: Path | None, *, batch_size: int,
                     chunk_len: int) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """(tokens, float16 entropies, computed?) of one doc shard; read from ``ent_path`` when it is valid."""
    tokens = [encode_array(d.data) for d in iter_table_docs(doc_table)]
    if ent_path is not None:
        table = _valid_existing(ent_path, doc_table.column("doc_id"), ENTROPY_SCHEMA)
        if table is not None:
            col = table.column("entropies").combine_chunks()
            flat = col.flatten().to_numpy(zero_copy_only=False)
            offsets = col.offsets.to_numpy()
            return tokens, [flat[offsets[i]: offsets[i + 1]] for i in range(len(tokens))], False
    ents = compute_entropies(model_fn(), tokens, batch_size=batch_size, chunk_len=chunk_len)
    return tokens, [e.astype(np.float16) for e in ents], True


def entropy_shard(model_fn, doc_path: Path, ent_path: Path, *, batch_size: int, chunk_len: int) -> dict[str, Any]:
    """Phase 1 (calibrating builds): entropies of one doc shard into ``ent_path`` (kept if already valid)."""
    doc_table = read_shard(doc_path)
    if _valid_existing(ent_path, doc_table.column("doc_id"), ENTROPY_SCHEMA) is not None:
        return {"computed": False, "seconds": 0.0, "bytes": 0}
    started = time.perf_counter()
    _, ents16, _ = _shard_entropies(model_fn, doc_table, None, batch_size=batch_size, chunk_len=chunk_len)
    table = pa.Table.from_arrays([doc_table.column("doc_id").combine_chunks(),
                                  _list_array(ents16, np.float16, pa.float16())], schema=ENTROPY_SCHEMA)
    write_table_atomic(ent_path, table)
    nbytes = sum(e.size - 2 for e in ents16)
    return {"computed": True, "seconds": round(time.perf_counter() - started, 4), "bytes": nbytes}


def patch_shard(model_fn, patcher: Patcher, doc_path: Path, out_path: Path, *, batch_size: int, chunk_len: int,
                ent_path: Path | None = None) -> dict[str, Any]:
    """Entropies and patch lengths of one doc shard into ``out_path`` (kept if it exists and validates).

    Entropies come from ``ent_path`` (phase 1 of a calibrating build) when it holds them, else from the model.
    ``model_fn()`` returns the entropy model (called only if entropies must be computed).
    """
    doc_table = read_shard(doc_path)
    doc_bytes = sum(len(d.data) for d in iter_table_docs(doc_table))
    schema = _schema_for(patcher)
    existing = _valid_existing(out_path, doc_table.column("doc_id"), schema)
    if existing is not None:
        info = {"sha256": sha256_file(out_path), "rows": existing.num_rows, "file_bytes": out_path.stat().st_size}
        return {**info, **_shard_stats(existing.column("patch_lengths").combine_chunks()), "bytes": doc_bytes,
                "skipped": True, "computed_bytes": 0, "seconds": 0.0}
    started = time.perf_counter()
    tokens, ents16, computed = _shard_entropies(model_fn, doc_table, ent_path, batch_size=batch_size,
                                                chunk_len=chunk_len)
    # lengths from the float16 values that are stored, so re-patching stored entropies gives the same lengths
    lengths = [patcher.patch_lengths(t, e.astype(np.float32)) for t, e in zip(tokens, ents16)]
    for t, pl in zip(tokens, lengths):
        if int(pl.sum()) != t.size:
            raise AssertionError("patch lengths must cover the document's tokens")
    lengths_arr = _list_array(lengths, np.int32, pa.int32())
    table = pa.Table.from_arrays(
        [doc_table.column("doc_id").combine_chunks(), _list_array(ents16, np.float16, pa.float16()), lengths_arr],
        schema=schema,
    )
    info = write_table_atomic(out_path, table)
    return {**info, **_shard_stats(lengths_arr), "bytes": doc_bytes, "skipped": False,
            "computed_bytes": doc_bytes if computed else 0, "seconds": round(time.perf_counter() - started, 4)}


# ============================================================================================ workers
_WORKER: dict[str, Any] = {}


def _load_entropy_model(entropy_dir: str | Path) -> torch.nn.Module:
    from training.artifacts import load_model

    model, _, kind = load_model(entropy_dir)
    if kind not in ("entropy", "baseline"):
        raise ValueError(f"{entropy_dir}: expected an entropy model, found kind {kind!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 either way
    return model.float().to(device).eval()


class _LazyModel:
    """Loads the entropy model on first use (a build that only re-patches stored entropies never loads it)."""

    def __init__(self, entropy_dir: str | Path):
        self.entropy_dir = entropy_dir
        self.model: torch.nn.Module | None = None

    def __call__(self) -> torch.nn.Module:
        if self.model is None:
            self.model = _load_entropy_model(self.entropy_dir)
        return self.model


def _worker_init(entropy_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["model_fn"] = _LazyModel(entropy_dir)


def _run_job(model_fn, job: tuple) -> tuple[str, dict]:
    kind, rel, doc_path, out_path, ent_path, patcher, batch_size, chunk_len = job
    if kind == "entropy":
        res = entropy_shard(model_fn, Path(doc_path), Path(ent_path), batch_size=batch_size, chunk_len=chunk_len)
    else:
        res = patch_shard(model_fn, patcher, Path(doc_path), Path(out_path), batch_size=batch_size,
                          chunk_len=chunk_len, ent_path=None if ent_path is None else Path(ent_path))
    return rel, res


def _worker_run(job: tuple) -> tuple[str, dict]:
    return _run_job(_WORKER["model_fn"], job)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Runner:
    """Runs shard jobs in this process (1 worker) or in a pool of spawned processes, started once."""

    def __init__(self, workers: int, entropy_dir: Path):
        self.workers = workers
        self.entropy_dir = entropy_dir
        self.threads = torch.get_num_threads() if workers <= 1 else max(1, _cpus() // workers)
        self.local = _LazyModel(entropy_dir)
        self.pool: ProcessPoolExecutor | None = None

    def map(self, jobs: list[tuple]):
        if self.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield _run_job(self.local, job)
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                            initializer=_worker_init, initargs=(str(self.entropy_dir), self.threads))
        yield from self.pool.map(_worker_run, jobs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ============================================================================================ calibration
def _calibration_sample(ingest_dir: Path, n: int) -> list[tuple[str, str, int]]:
    """The ``n`` train docs (val if train is empty) with the smallest sha256(doc_id): (split, shard, row)."""
    for split in SPLITS:
        keyed = (
            (hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest(), path.name, row)
            for path in list_shards(ingest_dir, split)
            for row, doc_id in enumerate(read_shard(path).column("doc_id").to_pylist())
        )
        chosen = heapq.nsmallest(n, keyed)
        if chosen:
            return [(split, name, row) for _, name, row in chosen]
    return []


def _read_calibration(out: Path, pcfg: PatchConfig) -> dict | None:
    try:
        saved = json.loads((out / CALIBRATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(saved, dict) and saved.get("target_bytes_per_patch") == pcfg.target_bytes_per_patch
    return saved if ok and isinstance(saved.get("threshold"), float) else None


def _calibrate(out: Path, pcfg: PatchConfig, ingest_dir: Path, ent_dir: Path) -> dict[str, Any]:
    """θ from the stored (float16) entropies of the sample; written to ``calibration.json``."""
    started = time.perf_counter()
    sample = _calibration_sample(ingest_dir, pcfg.calibration_docs)
    if not sample:
        raise ValueError(f"{ingest_dir}: no documents to calibrate the patch threshold on")
    tables: dict[tuple[str, str], pa.ChunkedArray] = {}
    ents = []
    for split, name, row in sample:
        if (split, name) not in tables:
            tables[(split, name)] = read_shard(ent_dir / split / name).column("entropies")
        ents.append(np.asarray(tables[(split, name)][row].values.to_numpy(zero_copy_only=False), np.float32))
    theta, achieved = calibrate_threshold(
        ents, pcfg.target_bytes_per_patch, monotonic=pcfg.monotonic, threshold_add=pcfg.threshold_add,
        max_patch_length=pcfg.max_patch_length, return_achieved=True,
    )
    result = {
        "threshold": theta, "target_bytes_per_patch": pcfg.target_bytes_per_patch,
        "sample_bytes_per_patch": round(achieved, 6), "docs": len(sample),
        "tokens": int(sum(e.size for e in ents)),
        "sample": "the calibration_docs train docs with the smallest sha256(doc_id) (val if train is empty)",
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(out / CALIBRATION_FILE, result)
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
    shards = [(f"{split}/{p.name}", p) for split in SPLITS for p in list_shards(ingest_dir, split)]
    ent_dir = out / ENTROPY_DIR
    workers = min(pcfg.num_workers, max(1, len(shards)))
    runner = _Runner(workers, entropy_dir)
    phase1_seconds, phase1_bytes, phase1_kept = 0.0, 0, 0
    try:
        calibration, threshold = None, pcfg.threshold
        use_ent_dir = False
        if pcfg.mode == "entropy" and threshold is None:
            calibration = _read_calibration(out, pcfg)  # a resumed build keeps the θ its shards were made with
            use_ent_dir = True
            if calibration is None:
                # phase 1: entropies of every shard (stored), so calibration costs no extra model pass
                t = time.perf_counter()
                jobs = [("entropy", rel, str(p), None, str(ent_dir / rel), None, pcfg.batch_size, pcfg.chunk_len)
                        for rel, p in shards]
                for rel, res in runner.map(jobs):
                    phase1_bytes += res["bytes"]
                    phase1_kept += not res["computed"]
                    log.info("patch: entropies of %s %s", rel, "computed" if res["computed"] else "kept")
                phase1_seconds = time.perf_counter() - t
                calibration = _calibrate(out, pcfg, ingest_dir, ent_dir)
            threshold = calibration["threshold"]
            log.info("patch: θ=%.6g (%.3f bytes/patch on %d sampled docs)", threshold,
                     calibration["sample_bytes_per_patch"], calibration["docs"])
        patcher = Patcher.from_config(pcfg, threshold=threshold)

        t = time.perf_counter()
        jobs = [("patch", rel, str(p), str(out / rel), str(ent_dir / rel) if use_ent_dir else None, patcher,
                 pcfg.batch_size, pcfg.chunk_len) for rel, p in shards]
        results: dict[str, dict] = {}
        for rel, res in runner.map(jobs):
            results[rel] = res
            log.info("patch: %s %s", rel, "kept" if res["skipped"] else "written")
        phase2_seconds = time.perf_counter() - t
    finally:
        runner.close()
    shutil.rmtree(ent_dir, ignore_errors=True)  # every final shard holds its entropies now

    computed_bytes = phase1_bytes + sum(r["computed_bytes"] for r in results.values())
    written = [r for r in results.values() if not r["skipped"]]
    seconds = phase1_seconds + phase2_seconds
    bytes_per_s = round(computed_bytes / seconds, 1) if computed_bytes and seconds > 0 else None
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
            "bytes_with_entropies_computed": computed_bytes, "shards_written": len(written),
            "shards_kept": len(results) - len(written), "entropy_shards_kept": phase1_kept,
            "entropy_phase_seconds": round(phase1_seconds, 3),
            "patch_phase_seconds": round(phase2_seconds, 3), "bytes_per_s": bytes_per_s, "workers": workers,
            "torch_threads_per_worker": runner.threads, "batch_size": pcfg.batch_size, "chunk_len": pcfg.chunk_len,
            "total_seconds": round(time.perf_counter() - started, 3),
        },
        "definitions": {
            "bytes_per_patch": "total tokens / total patches (BOS, EOS and the lone-BOS patch included)",
            "bytes_per_s": "document bytes whose entropies this build computed / seconds of the shard passes",
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


__all__ = ["PATCH_SCHEMA", "STAGE", "VERSION", "build_patch", "compute_entropies", "entropy_shard", "key_for",
           "patch_shard", "run_patch"]
