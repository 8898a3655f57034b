"""Bits-per-byte scoring of the BLT and of byte-level LMs on validation documents (pure torch + shards).

Every document is scored on its own (per-document rows, so each target byte is attributed to its source):

* targets are ``tokens[1:]`` of ``[BOS] + bytes+4 + [EOS]`` (EOS included, as in training and in the
  reference: BPB = sum CE / ln 2 / number of targets);
* **BLT rows** follow the training packer's rules (``training.packing``): at most ``seq_len`` patches and
  ``max_bytes + 1`` tokens per row, the first patch of every row has length 1 (a row starting inside a stored
  patch takes ``[1, p-1, ...]``), a patch overflowing the byte cap is cut and continues in the next row.
  Consecutive rows of a document overlap by one token, so every target is scored exactly once;
* **byte rows** (baseline / any ``ByteLM``): rows of ``seq_len + 1`` tokens overlapping by one token.

So the BLT and a byte-level model score exactly the same targets and their BPB compare directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blt_model.vocab import encode_array

LN2 = math.log(2.0)


@dataclass
class ValDoc:
    """One scored document: tokens ``[BOS] + bytes+4 (+ [EOS])`` and, if patched, its stored patch data."""

    doc_id: str
    source: str
    data: bytes
    tokens: np.ndarray
    patch_lengths: np.ndarray | None = None
    entropies: np.ndarray | None = None
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        return max(0, int(self.tokens.size) - 1)


def truncate_lengths(lengths: np.ndarray, n: int) -> np.ndarray:
    """Patch lengths of the first ``n`` positions (patches are prefix-stable: the last one is cut)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, n, side="left"))  # patch containing position n-1
    out = lengths[: k + 1].copy()
    out[-1] -= int(ends[k]) - n
    return out


def iter_val_docs(ingest_dir: str | Path, patch_dir: str | Path | None = None, split: str = "val") -> Iterator[ValDoc]:
    """Documents of a split in shard order, with their stored patch lengths/entropies when ``patch_dir`` is set."""
    from data.shards import iter_table_docs, list_shards, read_shard

    for path in list_shards(ingest_dir, split):
        table = read_shard(path)
        plen = ent = None
        if patch_dir is not None:
            ppath = Path(patch_dir) / split / path.name
            ptable = read_shard(ppath)
            if ptable.num_rows != table.num_rows or not ptable.column("doc_id").equals(table.column("doc_id")):
                raise ValueError(f"patch shard {ppath} is not aligned row for row with {path}")
            plen = ptable.column("patch_lengths").to_pylist()
            ent = ptable.column("entropies").to_pylist() if "entropies" in ptable.column_names else None
        for i, doc in enumerate(iter_table_docs(table)):
            data = bytes(doc.data)
            tokens = encode_array(data)
            lengths = np.asarray(plen[i], dtype=np.int64) if plen is not None else None
            if lengths is not None and int(lengths.sum()) != tokens.size:
                raise ValueError(f"patch lengths of {doc.doc_id!r} sum to {int(lengths.sum())}, not {tokens.size}")
            e = np.asarray(ent[i], dtype=np.float32) if ent is not None else None
            yield ValDoc(doc.doc_id, doc.source, data, tokens, lengths, e)


def take_bytes(docs: Iterable[ValDoc], max_bytes: int, sources: list[str] | None = None) -> list[ValDoc]:
    """Documents in order until ``max_bytes`` target bytes; a document that overflows is cut (``truncated``).

    With ``sources``, every source gets an equal share of ``max_bytes``, so the per-source BPB covers each
    source even when the shards list one source's documents first.
    """
    budgets = {None: max_bytes} if not sources else {s: max(1, max_bytes // len(sources)) for s in sources}
    used = dict.fromkeys(budgets, 0)
    out: list[ValDoc] = []
    for d in docs:
        key = d.source if sources else None
        if key not in budgets:
            continue
        if all(used[k] >= budgets[k] for k in budgets):
            break
        room = budgets[key] - used[key]
        if room <= 0:
            continue
        if d.n_targets > room:
            n = room + 1  # tokens kept: BOS + room targets
            d = ValDoc(d.doc_id, d.source, d.data[: max(0, n - 1)], d.tokens[:n],
                       None if d.patch_lengths is None else truncate_lengths(d.patch_lengths, n),
                       None if d.entropies is None else d.entropies[:n], truncated=True)
        if d.n_targets <= 0:
            continue
        out.append(d)
        used[key] += d.n_targets
    return out


# ------------------------------------------------------------------------------------------------ rows
def patch_rows(tokens: np.ndarray, lengths: np.ndarray, seq_len: int, max_bytes: int):
    """Rows ``(tokens, patch_lengths)`` of one document under the training packer's rules (module doc).

    Each row's lengths sum to its token count (``len(x) + 1`` after the x/y shift); rows overlap by one token.
    """
    n = int(tokens.size)
    if n < 2:
        return []
    start = np.zeros(n + 1, dtype=bool)
    start[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
    rows = []
    pos = 0
    while pos < n - 1:
        local = start[pos:n].copy()
        local[0] = True
        if local.size > 1:
            local[1] = True  # rule 1: a row starting inside a patch takes [1, p-1, ...]
        starts = np.flatnonzero(local)
        end = min(n - 1, pos + max_bytes)  # last token index of the row (max_bytes + 1 tokens)
        if starts.size > seq_len:  # patch budget: stop before the (seq_len+1)-th patch
            end = min(end, pos + int(starts[seq_len]) - 1)
        m = end - pos + 1
        row_starts = starts[starts < m]
        row_lengths = np.diff(row_starts, append=m)
        rows.append((tokens[pos: end + 1], row_lengths.astype(np.int64)))
        pos = end
    return rows


def byte_rows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Rows of up to ``seq_len + 1`` tokens overlapping by one token (every target once)."""
    n = int(tokens.size)
    return [tokens[p: p + seq_len + 1] for p in range(0, max(n - 1, 0), seq_len)]


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class Score:
    """Summed cross-entropy (nats) and target count, per source and overall."""

    ce: float = 0.0
    n: int = 0
    per_source: dict[str, list[float]] = field(default_factory=dict)  # source -> [ce, n]
    patches: int = 0
    tokens: int = 0

    def add(self, source: str, ce: float, n: int) -> None:
        self.ce += ce
        self.n += n
        acc = self.per_source.setdefault(source, [0.0, 0])
        acc[0] += ce
        acc[1] += n

    @property
    def bpb(self) -> float:
        return self.ce / LN2 / self.n if self.n else float("nan")

    def source_bpb(self) -> dict[str, float]:
        return {s: (c / LN2 / n if n else float("nan")) for s, (c, n) in sorted(self.per_source.items())}

    def source_bytes(self) -> dict[str, int]:
        return {s: int(n) for s, (_, n) in sorted(self.per_source.items())}


def _batched(items: list, batch_size: int) -> Iterator[list]:
    for i in range(0, len(items), batch_size):
        yield items[i: i + batch_size]


@torch.inference_mode()
def score_blt(model, docs: list[ValDoc], seq_len: int, max_bytes: int, batch_size: int = 8,
              device: str | torch.device = "cpu") -> Score:
    """BPB of a BLT on ``docs`` with their stored patch lengths (packer-rule rows, see module doc)."""
    from training.packing import patch_batch

    score = Score()
    rows: list[tuple[str, np.ndarray, np.ndarray]] = []
    for d in docs:
        if d.patch_lengths is None:
            raise ValueError(f"document {d.doc_id!r} has no patch lengths")
        score.tokens += int(d.tokens.size)
        score.patches += int(d.patch_lengths.size)
        rows += [(d.source, t, pl) for t, pl in patch_rows(d.tokens, d.patch_lengths, seq_len, max_bytes)]
    rows.sort(key=lambda r: r[1].size)  # similar lengths together: less padding
    for chunk in _batched(rows, batch_size):
        b = patch_batch([(t, pl) for _, t, pl in chunk], seq_len, max_bytes, pad_multiple=8)
        x = torch.from_numpy(b["x"]).to(device)
        logits = model(x, torch.from_numpy(b["patch_lengths"]).to(device))
        _accumulate(score, [s for s, _, _ in chunk], logits, b)
    return score


@torch.inference_mode()
def score_bytelm(model, docs: list[ValDoc], seq_len: int, batch_size: int = 8,
                 device: str | torch.device = "cpu") -> Score:
    """BPB of a byte-level LM (``ByteLM``) on ``docs``, rows of ``seq_len`` targets."""
    from training.packing import byte_batch

    score = Score()
    rows = [(d.source, r) for d in docs for r in byte_rows(d.tokens, seq_len)]
    rows.sort(key=lambda r: r[1].size)
    for chunk in _batched(rows, batch_size):
        width = max(r.size for _, r in chunk) - 1
        b = byte_batch([r for _, r in chunk], width)
        logits = model(torch.from_numpy(b["x"]).to(device))
        _accumulate(score, [s for s, _ in chunk], logits, b)
    return score


def _accumulate(score: Score, sources: list[str], logits: torch.Tensor, batch: dict) -> None:
    y = torch.from_numpy(batch["y"]).to(logits.device)
    mask = torch.from_numpy(batch["mask"]).to(logits.device)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    ce = (ce * mask).sum(1).double().cpu().tolist()
    n = mask.sum(1).cpu().tolist()
    for s, c, k in zip(sources, ce, n):
        score.add(s, float(c), int(k))


__all__ = ["LN2", "Score", "ValDoc", "byte_rows", "iter_val_docs", "patch_rows", "score_blt", "score_bytelm",
           "take_bytes", "truncate_lengths"]
