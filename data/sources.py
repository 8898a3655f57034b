"""Ingest sources: where documents come from (``kind`` of ``SourceConfig``).

Each source is *planned* first (paths resolved, files stat'ed, the hub checked) so that its fingerprint joins
the ingest stage key, then read as a stream of ``(doc_id, part, data)``: ``data`` holds the document's bytes
exactly as stored; ``part`` is None for a whole document, or 0, 1, ... when a file larger than
``max_doc_bytes`` is read in pieces (so a huge file is never held in memory at once).

* ``default``: the interpreter's stdlib sources and docs (``data.default_corpus``), capped at
  ``default_corpus_bytes``. ids ``default:<relative path>``.
* ``files``: files, directories (walked recursively, sorted, hidden entries skipped, symlinked directories not
  followed) and globs (``**`` allowed), taken in the order given, each file once. By extension:
  ``.jsonl`` - one document per line (blank lines ignored); ``.json`` - a JSON array of records (parsed whole:
  use ``.jsonl`` for large inputs) or, when it does not start with ``[``, JSON lines; ``.parquet`` - one
  document per row, read batch by batch; any other extension - the whole file is one document of raw bytes.
  Record text is the string (UTF-8) or bytes in ``text_field``; a null text counts as an empty document.
  ids ``<label>:<path as configured>`` for whole files, ``...#L<line>`` for JSON lines,
  ``...#<index>`` for array records and parquet rows, ``<label>:<id>`` when ``id_field`` is set.
* ``hub``: a Hugging Face dataset, ``datasets.load_dataset(name, subset, split=..., streaming=True)``;
  reachability is checked first (2 s), so an offline machine fails at once with a clear message.
  ids ``<label>:<row index>`` (or ``<label>:<id>``).

Labels (the ``source`` column): ``default``, ``files``, ``hub:<name>[/<subset>]:<split>``; a label used
twice gets ``#2``, ``#3``... in config order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from blt_pipeline.config import IngestConfig, SourceConfig
from data.default_corpus import default_corpus_files, stdlib_root

try:  # orjson ships with prefect: ~3x faster than json for JSON lines; same strictness (UTF-8 required)
    import orjson

    _loads = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover
    _loads = json.loads
    _JSONError = (ValueError,)


class IngestError(ValueError):
    """Bad ingest input (missing/unreadable path, malformed record, hub unreachable); one-line message."""


@dataclass
class SourceStats:
    kind: str
    docs: int = 0  # rows written (a document split by max_doc_bytes counts once per part)
    bytes: int = 0
    files: int = 0
    skipped_empty: int = 0
    skipped_short: int = 0
    skipped_bad_records: int = 0
    stopped_by: str | None = None  # max_docs, max_bytes or max_total_bytes when a limit ended the source
    budget_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlannedFile:
    doc_path: str  # the path as configured (used in doc ids)
    path: str  # the path opened
    size: int
    mtime_ns: int


def _safe_text(s: str) -> str:
    """A valid UTF-8 string for Arrow (file names that are not UTF-8 get backslash escapes)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s).decode("utf-8", "backslashreplace")


def _digest(lines: list[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def _lines(path: str, block: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a file read in large blocks (cheaper than line-buffered reads)."""
    try:
        fh = open(path, "rb", buffering=0)
    except OSError as err:
        raise IngestError(f"cannot read {path}: {err.strerror or err}") from None
    lineno = 0
    rest = b""
    with fh:
        while True:
            try:
                chunk = fh.read(block)
            except OSError as err:
                raise IngestError(f"cannot read {path}: {err.strerror or err}") from None
            if not chunk:
                break
            lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
            rest = lines.pop()
            for line in lines:
                lineno += 1
                yield lineno, line
    if rest:
        yield lineno + 1, rest


# ------------------------------------------------------------------------------------------------- base
class Source:
    kind = "?"

    def __init__(self, cfg: SourceConfig, label: str, data_cfg: IngestConfig):
        self.cfg = cfg
        self.label = label
        self.data_cfg = data_cfg

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def iter_docs(self, stats: SourceStats) -> Iterator[tuple[str, int | None, bytes]]:
        raise NotImplementedError

    # helpers shared by file-based sources
    def _read_raw(self, f: PlannedFile, doc_id: str) -> Iterator[tuple[str, int | None, bytes]]:
        max_doc = self.data_cfg.max_doc_bytes
        try:
            with open(f.path, "rb") as fh:
                if max_doc is not None and f.size > max_doc:
                    part = 0
                    while chunk := fh.read(max_doc):
                        yield doc_id, part, chunk
                        part += 1
                    return
                data = fh.read()
        except OSError as err:
            raise IngestError(f"cannot read {f.path}: {err.strerror or err}") from None
        if len(data) != f.size:
            raise IngestError(f"{f.path} changed while being ingested ({f.size} bytes planned, {len(data)} read)")
        yield doc_id, None, data

    def _record_text(self, rec: Any) -> tuple[bytes | None, str | None, str | None]:
        """(text bytes, record id, error reason) of one JSON record."""
        if not isinstance(rec, dict):
            return None, None, f"expected a JSON object, got {type(rec).__name__}"
        field = self.cfg.text_field
        if field not in rec:
            return None, None, f"no field {field!r}"
        text = rec[field]
        rid = None
        if self.cfg.id_field is not None:
            if rec.get(self.cfg.id_field) is None:
                return None, None, f"no id field {self.cfg.id_field!r}"
            rid = str(rec[self.cfg.id_field])
        if text is None:
            return b"", rid, None
        if isinstance(text, str):
            try:
                return text.encode("utf-8"), rid, None
            except UnicodeEncodeError:
                return None, None, f"field {field!r} is not valid Unicode (lone surrogate)"
        return None, None, f"field {field!r} is {type(text).__name__}, not a string"

    def _bad(self, stats: SourceStats, where: str, reason: str) -> None:
        if self.cfg.on_bad_record == "skip":
            stats.skipped_bad_records += 1
            return
        raise IngestError(f"{where}: bad record ({reason}); fix it or set on_bad_record=skip for this source")


# ---------------------------------------------------------------------------------------------- default
class DefaultSource(Source):
    kind = "default"

    def __init__(self, cfg: SourceConfig, label: str, data_cfg: IngestConfig):
        super().__init__(cfg, label, data_cfg)
        self.root = stdlib_root()
        corpus = default_corpus_files(data_cfg.default_corpus_bytes, self.root)
        if not corpus:
            raise IngestError(f"default corpus: no text files found under {self.root}; give kind=files sources")
        self.files = [PlannedFile(c.rel, c.path, c.size, c.mtime_ns) for c in corpus]

    def fingerprint(self) -> dict[str, Any]:
        import sys

        return {
            "kind": "default", "label": self.label, "root": str(self.root), "python": sys.version.split()[0],
            "files": len(self.files), "bytes": sum(f.size for f in self.files),
            "digest": _digest([f"{f.doc_path}\t{f.size}\t{f.mtime_ns}" for f in self.files]),
        }

    def iter_docs(self, stats: SourceStats) -> Iterator[tuple[str, int | None, bytes]]:
        for f in self.files:
            stats.files += 1
            yield from self._read_raw(f, f"{self.label}:{_safe_text(f.doc_path)}")


# ------------------------------------------------------------------------------------------------ files
class FilesSource(Source):
    kind = "files"

    def __init__(self, cfg: SourceConfig, label: str, data_cfg: IngestConfig):
        super().__init__(cfg, label, data_cfg)
        self.files = self._plan()

    def _plan(self) -> list[PlannedFile]:
        seen: set[str] = set()
        out: list[PlannedFile] = []

        def add(doc_path: str, path: str, explicit: bool) -> None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if os.path.islink(path):
                    raise IngestError(f"cannot read {path}: broken symbolic link") from None
                raise IngestError(f"no such file or directory: {path}") from None
            except OSError as err:
                raise IngestError(f"cannot read {path}: {err.strerror or err}") from None
            if not stat.S_ISREG(st.st_mode):
                if explicit:
                    raise IngestError(f"cannot read {path}: not a regular file or directory")
                return  # sockets, FIFOs, devices inside a walked directory are not documents
            real = os.path.realpath(path)
            if real in seen:
                return
            seen.add(real)
            out.append(PlannedFile(doc_path, path, st.st_size, st.st_mtime_ns))

        def walk(entry: str) -> None:
            base = os.path.normpath(entry)
            for dirpath, dirnames, filenames in os.walk(os.path.expanduser(entry)):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel_dir = os.path.relpath(dirpath, os.path.expanduser(entry))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                    add(Path(base, rel).as_posix(), os.path.join(dirpath, name), explicit=False)

        def take(entry: str, explicit: bool) -> None:
            path = os.path.expanduser(entry)
            if os.path.isdir(path):
                walk(entry)
            else:
                add(Path(os.path.normpath(entry)).as_posix(), path, explicit)

        for entry in self.cfg.paths:
            if glob.has_magic(entry):
                matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
                if not matches:
                    raise IngestError(f"no files match {entry}")
                for m in matches:
                    take(m, explicit=False)
            else:
                if not os.path.lexists(os.path.expanduser(entry)):
                    raise IngestError(f"no such file or directory: {entry}")
                take(entry, explicit=True)
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "files", "label": self.label, "paths": list(self.cfg.paths), "files": len(self.files),
            "bytes": sum(f.size for f in self.files),
            "digest": _digest([f"{f.doc_path}\t{os.path.abspath(f.path)}\t{f.size}\t{f.mtime_ns}"
                               for f in self.files]),
        }

    def iter_docs(self, stats: SourceStats) -> Iterator[tuple[str, int | None, bytes]]:
        for f in self.files:
            stats.files += 1
            base = f"{self.label}:{_safe_text(f.doc_path)}"
            suffix = os.path.splitext(f.path)[1].lower()
            if suffix == ".jsonl":
                yield from self._iter_jsonl(f, base, stats)
            elif suffix == ".json":
                yield from self._iter_json(f, base, stats)
            elif suffix == ".parquet":
                yield from self._iter_parquet(f, base, stats)
            else:
                yield from self._read_raw(f, base)

    def _doc_id(self, base: str, local: str, rid: str | None) -> str:
        return f"{self.label}:{_safe_text(rid)}" if rid is not None else f"{base}#{local}"

    def _iter_jsonl(self, f: PlannedFile, base: str, stats: SourceStats):
        for lineno, line in _lines(f.path):
            if not line.strip():
                continue
            try:
                rec = _loads(line)
            except _JSONError as err:
                self._bad(stats, f"{f.path}:{lineno}", f"invalid JSON: {str(err).splitlines()[0][:120]}")
                continue
            text, rid, reason = self._record_text(rec)
            if reason is not None:
                self._bad(stats, f"{f.path}:{lineno}", reason)
                continue
            yield self._doc_id(base, f"L{lineno}", rid), None, text

    def _iter_json(self, f: PlannedFile, base: str, stats: SourceStats):
        try:
            with open(f.path, "rb") as fh:
                head = fh.read(4096).lstrip()
                if not head.startswith(b"["):
                    pass_through = True
                else:
                    pass_through = False
                    fh.seek(0)
                    raw = fh.read()
        except OSError as err:
            raise IngestError(f"cannot read {f.path}: {err.strerror or err}") from None
        if pass_through:  # JSON lines in a .json file (the common HF layout)
            yield from self._iter_jsonl(f, base, stats)
            return
        try:
            records = json.loads(raw)
        except ValueError as err:
            line = getattr(err, "lineno", None)
            where = f"{f.path}:{line}" if line else str(f.path)
            raise IngestError(f"{where}: not valid JSON ({str(err).splitlines()[0][:120]})") from None
        del raw
        for i, rec in enumerate(records):
            text, rid, reason = self._record_text(rec)
            if reason is not None:
                self._bad(stats, f"{f.path}: record {i}", reason)
                continue
            yield self._doc_id(base, str(i), rid), None, text

    def _iter_parquet(self, f: PlannedFile, base: str, stats: SourceStats):
        import pyarrow as pa
        import pyarrow.parquet as pq

        field, id_field = self.cfg.text_field, self.cfg.id_field
        try:
            pf = pq.ParquetFile(f.path)
        except (OSError, pa.ArrowException) as err:
            raise IngestError(f"cannot read {f.path} as parquet: {str(err).splitlines()[0][:160]}") from None
        names = pf.schema_arrow.names
        for need in [field] + ([id_field] if id_field else []):
            if need not in names:
                raise IngestError(f"{f.path}: no column {need!r} (columns: {', '.join(names)})")
        ftype = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype) or pa.types.is_binary(ftype)
                or pa.types.is_large_binary(ftype) or pa.types.is_string_view(ftype)
                or pa.types.is_binary_view(ftype)):
            raise IngestError(f"{f.path}: column {field!r} is {ftype}, not text or binary")
        cols = [field] + ([id_field] if id_field else [])
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                texts = batch.column(field).cast(pa.large_binary()).to_pylist()
                ids = batch.column(id_field).to_pylist() if id_field else None
                for j, text in enumerate(texts):
                    rid = None
                    if ids is not None:
                        if ids[j] is None:
                            self._bad(stats, f"{f.path}: row {index}", f"no id field {id_field!r}")
                            index += 1
                            continue
                        rid = str(ids[j])
                    yield self._doc_id(base, str(index), rid), None, text if text is not None else b""
                    index += 1
        except (OSError, pa.ArrowException) as err:
            raise IngestError(f"cannot read {f.path} as parquet: {str(err).splitlines()[0][:160]}") from None


# -------------------------------------------------------------------------------------------------- hub
def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_hub_reachable(timeout_s: float = 2.0) -> None:
    """Raise IngestError at once when the HF hub is offline or unreachable (never hang on DNS/TCP)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(var):
            raise IngestError(
                f"Hugging Face hub unreachable: offline mode ({var}=1); unset it or use local files "
                "(sources: [{kind: files, paths: [...]}])"
            )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result["ok"] = True
        except OSError as err:
            result["err"] = err

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    if not result.get("ok"):
        why = result.get("err") or f"no answer within {timeout_s:g} s"
        raise IngestError(
            f"Hugging Face hub unreachable ({host}:{port}: {why}); the machine looks offline - use local files "
            "(sources: [{kind: files, paths: [...]}]) or the default corpus"
        )


class HubSource(Source):
    kind = "hub"

    def __init__(self, cfg: SourceConfig, label: str, data_cfg: IngestConfig):
        super().__init__(cfg, label, data_cfg)
        check_hub_reachable()
        self.revision = None
        try:
            from huggingface_hub import HfApi

            self.revision = HfApi().dataset_info(cfg.name, timeout=10).sha
        except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear line
            raise IngestError(f"hub dataset {cfg.name!r}: {type(err).__name__}: {str(err).splitlines()[0][:160]}") \
                from None

    def fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {"kind": "hub", "label": self.label, "name": c.name, "subset": c.subset, "split": c.split,
                "revision": self.revision}

    def iter_docs(self, stats: SourceStats) -> Iterator[tuple[str, int | None, bytes]]:
        import datasets

        c = self.cfg
        try:
            ds = datasets.load_dataset(c.name, c.subset, split=c.split, streaming=True, revision=self.revision)
            rows = iter(ds)
        except Exception as err:  # noqa: BLE001
            raise IngestError(f"hub dataset {c.name!r}: {type(err).__name__}: {str(err).splitlines()[0][:160]}") \
                from None
        stats.files += 1
        for i, row in enumerate(rows):
            text = row.get(c.text_field) if isinstance(row, dict) else None
            if isinstance(text, bytes):
                data, rid, reason = text, (str(row[c.id_field]) if c.id_field and row.get(c.id_field) is not None
                                           else None), None
            else:
                data, rid, reason = self._record_text(row)
            if reason is not None:
                self._bad(stats, f"{c.name} row {i}", reason)
                continue
            yield (f"{self.label}:{_safe_text(rid)}" if rid is not None else f"{self.label}:{i}"), None, data


# ------------------------------------------------------------------------------------------------ build
def _base_label(cfg: SourceConfig) -> str:
    if cfg.kind == "hub":
        return f"hub:{cfg.name}" + (f"/{cfg.subset}" if cfg.subset else "") + f":{cfg.split}"
    return cfg.kind


def build_sources(data_cfg: IngestConfig) -> list[Source]:
    """Plan every configured source (the default corpus when none is given); raises IngestError early."""
    configs = list(data_cfg.sources) or [SourceConfig(kind="default")]
    counts: dict[str, int] = {}
    out: list[Source] = []
    for sc in configs:
        base = _base_label(sc)
        counts[base] = counts.get(base, 0) + 1
        label = base if counts[base] == 1 else f"{base}#{counts[base]}"
        cls = {"default": DefaultSource, "files": FilesSource, "hub": HubSource}[sc.kind]
        out.append(cls(sc, label, data_cfg))
    return out


__all__ = [
    "DefaultSource", "FilesSource", "HubSource", "IngestError", "PlannedFile", "Source", "SourceStats",
    "build_sources", "check_hub_reachable",
]
