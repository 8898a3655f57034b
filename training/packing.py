"""Packing documents into training rows, deterministically and resumably.

Two row shapes (see ``shared/docs/BLT_REFERENCE.md`` §3):

**Byte rows** (entropy model, byte-level baseline): the token streams of consecutive documents
(``[BOS] + bytes+4 + [EOS]`` each, ``blt_model.vocab``) are concatenated and cut into rows of ``seq_len + 1``
tokens; row k is ``stream[k*seq_len : k*seq_len + seq_len + 1]`` (consecutive rows overlap by one token, so
every token after the first is a target exactly once). ``x = row[:-1]``, ``y = row[1:]``. Document
boundaries inside a row are left to the model (its masks split at EOS).

**Patch rows** (BLT): documents come with their stored patch lengths (first patch = the lone BOS, lengths
sum to the document's token count). A row takes a **fixed budget of ``seq_len`` patches** from the stream,
as the official ``SequenceIterator``/``PackingIterator`` do, so every batch runs the same number of global
(latent) steps and the expensive global transformer never sees a varying or padded sequence count; the
number of bytes per row varies instead. Rules, in order:

1. The first patch of every row has length 1 (reference §3.6): a row that starts inside a patch of length
   p > 1 takes ``[1, p-1, ...]``. Without this the first global patch would summarise bytes that later
   positions of the same patch predict (future leakage).
2. Bytes are capped at ``max_bytes``: ``len(x) <= max_bytes``, i.e. at most ``max_bytes + 1`` tokens. A patch
   that would overflow the cap is cut at the cap and **its remainder starts the next row** (the official
   pipeline truncates and drops those bytes; here no byte of the stream is lost, only a patch boundary moves,
   which rule 1 already does at every row start). Rows that hit the cap before using their patch budget
   have trailing zero-length patches (as in the official code).
3. ``x = tokens[:-1]``, ``y = tokens[1:]``; a batch pads ``x``/``y`` with 0 (BOE/pad) to the longest row
   (rounded up to ``pad_multiple``, never beyond ``max_bytes``), ``mask`` is False on padding, and the padding
   is added to the row's last non-empty patch, so ``patch_lengths.sum(row) == len(x_row) + 1`` always.

Invariants are asserted on every batch (``check_patch_batch``): first patch 1, sums, fixed patch budget,
mask = real targets only.

**Order and resume.** Documents are read through ``data.shards`` in a deterministic order: per epoch a
seeded permutation of the shards and, within each shard, of its rows (``shuffle=False``: file order). The
packer's whole position is a small dict (``PackState``: epoch, shard position, row position, patch/token
offsets inside the current document, previous token), so a checkpoint can store it and a resumed run
continues with exactly the rows an uninterrupted run would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from blt_model.vocab import PAD_ID, encode_array
from data.shards import iter_table_docs, list_shards, read_shard


class PackingError(ValueError):
    """Shards are missing, empty or misaligned (doc vs patch shards), or a packing invariant failed."""


# ----------------------------------------------------------------------------------------------- documents
class DocSource:
    """Documents of one split (and their patch lengths when ``patch_dir`` is given) in a deterministic order.

    ``doc(epoch, shard_pos, row_pos)`` returns ``(tokens, patch_lengths | None)``; ``shard_pos`` indexes the
    epoch's shard order and ``row_pos`` the epoch's row order inside that shard.
    """

    def __init__(self, ingest_dir: str | Path, split: str, patch_dir: str | Path | None = None,
                 shuffle: bool = False, seed: int = 0):
        self.ingest_dir = Path(ingest_dir)
        self.patch_dir = Path(patch_dir) if patch_dir is not None else None
        self.split = split
        self.shuffle = shuffle
        self.seed = seed
        self.shards = list_shards(self.ingest_dir, split)
        if not self.shards:
            raise PackingError(f"no {split} shards in {self.ingest_dir / split}")
        if self.patch_dir is not None:
            names = [p.name for p in list_shards(self.patch_dir, split)]
            if names != [p.name for p in self.shards]:
                raise PackingError(f"patch shards in {self.patch_dir / split} ({names}) do not match the doc "
                                   f"shards ({[p.name for p in self.shards]})")
        self._cache_key: int | None = None
        self._docs: list = []
        self._plen: tuple[np.ndarray, np.ndarray] | None = None
        self._order_cache: dict[tuple[int, int], np.ndarray] = {}
        self._shard_order: tuple[int, np.ndarray] | None = None

    # orders ---------------------------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        if self._shard_order is None or self._shard_order[0] != epoch:
            n = len(self.shards)
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle else np.arange(n)
            self._shard_order = (epoch, order)
        return self._shard_order[1]

    def row_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._order_cache:
            n = len(self._load(shard)[0])
            order = (np.random.default_rng([self.seed, epoch, 1, shard]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order_cache = {key: order}  # one shard at a time
        return self._order_cache[key]

    # reading --------------------------------------------------------------------------------------------
    def _load(self, shard: int):
        if self._cache_key != shard:
            table = read_shard(self.shards[shard])
            self._docs = list(iter_table_docs(table))
            self._plen = None
            if self.patch_dir is not None:
                ppath = self.patch_dir / self.split / self.shards[shard].name
                ptable = read_shard(ppath)
                if ptable.num_rows != table.num_rows or not ptable.column("doc_id").equals(table.column("doc_id")):
                    raise PackingError(f"patch shard {ppath} is not aligned row for row with {self.shards[shard]}")
                col = ptable.column("patch_lengths").combine_chunks()
                if isinstance(col, pa.ChunkedArray):  # pragma: no cover - empty tables
                    col = pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], pa.list_(pa.int32()))
                offsets = np.asarray(col.offsets, dtype=np.int64)
                values = np.asarray(col.values, dtype=np.int64)
                self._plen = (offsets, values)
            self._cache_key = shard
        return self._docs, self._plen

    def doc(self, epoch: int, shard_pos: int, row_pos: int) -> tuple[np.ndarray, np.ndarray | None]:
        shard = int(self.shard_order(epoch)[shard_pos])
        docs, plen = self._load(shard)
        row = int(self.row_order(epoch, shard)[row_pos])
        tokens = encode_array(docs[row].data)
        if plen is None:
            return tokens, None
        offsets, values = plen
        lengths = values[offsets[row]: offsets[row + 1]]
        if lengths.size == 0 or lengths[0] != 1 or int(lengths.sum()) != tokens.size or (lengths <= 0).any():
            raise PackingError(
                f"patch lengths of doc {docs[row].doc_id!r} ({self.shards[shard].name} row {row}) are invalid: "
                f"first={lengths[:1].tolist()}, sum={int(lengths.sum())}, tokens={tokens.size}")
        return tokens, lengths

    def n_rows(self, epoch: int, shard_pos: int) -> int:
        return len(self._load(int(self.shard_order(epoch)[shard_pos]))[0])


# ----------------------------------------------------------------------------------------------- state
@dataclass
class PackState:
    """The packer's position: everything needed to continue the row stream exactly."""

    epoch: int = 0
    shard_pos: int = 0
    row_pos: int = 0
    tok_off: int = 0  # tokens of the current document already used
    patch_idx: int = 0  # patch mode: current patch of the current document
    patch_off: int = 0  # patch mode: tokens of that patch already used (a patch split at a row edge)
    prev: int = -1  # byte mode: the last token of the previous row (first token of the next), -1 = none
    rows: int = 0  # rows produced so far
    done: bool = False  # a non-looping stream is exhausted

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> PackState:
        return cls(**d) if d else cls()


class _Cursor:
    """Walks documents (looping over epochs if asked) on behalf of a packer."""

    def __init__(self, source: DocSource, state: PackState, loop: bool):
        self.source, self.state, self.loop = source, state, loop
        self._doc_key = None
        self.tokens: np.ndarray | None = None
        self.lengths: np.ndarray | None = None
        self.starts: np.ndarray | None = None

    def current(self) -> bool:
        """Load the document under the cursor; False at the end of a non-looping stream."""
        s = self.state
        while True:
            if s.done:
                return False
            if s.shard_pos >= len(self.source.shards):
                if not self.loop:
                    s.done = True
                    return False
                s.epoch, s.shard_pos, s.row_pos = s.epoch + 1, 0, 0
                continue
            if s.row_pos >= self.source.n_rows(s.epoch, s.shard_pos):
                s.shard_pos, s.row_pos = s.shard_pos + 1, 0
                continue
            key = (s.epoch, s.shard_pos, s.row_pos)
            if key != self._doc_key:
                self.tokens, self.lengths = self.source.doc(*key)
                self.starts = None if self.lengths is None else np.concatenate([[0], np.cumsum(self.lengths)])
                self._doc_key = key
            return True

    def next_doc(self) -> None:
        s = self.state
        s.row_pos, s.tok_off, s.patch_idx, s.patch_off = s.row_pos + 1, 0, 0, 0


# ----------------------------------------------------------------------------------------------- packers
class BytePacker:
    """Rows of ``seq_len + 1`` tokens from the concatenated document stream (consecutive rows overlap by 1)."""

    def __init__(self, source: DocSource, seq_len: int, loop: bool = True, state: dict | None = None):
        self.seq_len = seq_len
        self.state = PackState.from_dict(state)
        self.cursor = _Cursor(source, self.state, loop)

    def next_row(self) -> np.ndarray | None:
        """The next row (``seq_len + 1`` tokens, fewer only at the end of a non-looping stream) or None."""
        s, want = self.state, self.seq_len + 1
        parts = [np.array([s.prev], dtype=np.int64)] if s.prev >= 0 else []
        have = len(parts)
        while have < want and self.cursor.current():
            toks = self.cursor.tokens
            take = min(want - have, toks.size - s.tok_off)
            parts.append(toks[s.tok_off: s.tok_off + take])
            have += take
            s.tok_off += take
            if s.tok_off >= toks.size:
                self.cursor.next_doc()
        if have < 2:
            return None
        row = np.concatenate(parts)
        s.prev = int(row[-1])
        s.rows += 1
        return row


class PatchPacker:
    """Rows of at most ``seq_len`` patches and ``max_bytes + 1`` tokens, first patch of length 1."""

    def __init__(self, source: DocSource, seq_len: int, max_bytes: int, loop: bool = True,
                 state: dict | None = None):
        if source.patch_dir is None:
            raise PackingError("PatchPacker needs a DocSource with patch shards")
        if max_bytes < 1:
            raise PackingError(f"max_bytes must be >= 1, got {max_bytes}")
        self.seq_len, self.max_bytes = seq_len, max_bytes
        self.state = PackState.from_dict(state)
        self.cursor = _Cursor(source, self.state, loop)

    def next_row(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(tokens, patch_lengths)`` with lengths summing to ``len(tokens)``, or None at the end."""
        s, cap, budget = self.state, self.max_bytes + 1, self.seq_len
        toks: list[np.ndarray] = []
        lens: list[np.ndarray] = []
        n = k = 0  # tokens and patches in the row so far
        while k < budget and n < cap and self.cursor.current():
            c = self.cursor
            start = int(c.starts[s.patch_idx]) + s.patch_off
            whole = False
            if k == 0:  # rule 1: the row's first patch is one token (a split patch when p > 1)
                take = np.ones(1, dtype=np.int64)
            else:  # whole patches of this document while they fit (vectorised), else part of one (rule 2)
                rem = c.lengths[s.patch_idx: s.patch_idx + budget - k].copy()
                rem[0] -= s.patch_off
                fit = int(np.searchsorted(np.cumsum(rem), cap - n, side="right"))
                whole = fit > 0
                take = rem[:fit] if whole else np.array([cap - n], dtype=np.int64)
            width = int(take.sum())
            toks.append(c.tokens[start: start + width])
            lens.append(take)
            n += width
            k += take.size
            if whole:  # whole patches consumed (the first of them possibly partly used before)
                s.patch_idx, s.patch_off = s.patch_idx + take.size, 0
            else:  # part of the current patch (a row's first token, or a cut at the byte cap)
                s.patch_off += width
                if s.patch_off == int(c.lengths[s.patch_idx]):
                    s.patch_idx, s.patch_off = s.patch_idx + 1, 0
            if s.patch_idx == c.lengths.size:
                c.next_doc()
        if n < 2:
            return None
        s.rows += 1
        return np.concatenate(toks), np.concatenate(lens).astype(np.int64)


# ----------------------------------------------------------------------------------------------- batches
def byte_batch(rows: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Rows of up to ``seq_len + 1`` tokens -> ``x, y`` ``[B, seq_len]`` (pad 0) and ``mask`` (real targets)."""
    b = len(rows)
    x = np.full((b, seq_len), PAD_ID, dtype=np.int64)
    y = np.full((b, seq_len), PAD_ID, dtype=np.int64)
    mask = np.zeros((b, seq_len), dtype=bool)
    for i, row in enumerate(rows):
        m = row.size - 1
        x[i, :m], y[i, :m], mask[i, :m] = row[:-1], row[1:], True
    return {"x": x, "y": y, "mask": mask}


def patch_batch(rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int, max_bytes: int,
                pad_multiple: int = 64) -> dict[str, np.ndarray]:
    """Patch rows -> ``x, y, mask [B, L]`` and ``patch_lengths [B, seq_len]`` (module docstring, rule 3)."""
    longest = max(t.size - 1 for t, _ in rows)
    width = min(max_bytes, -(-longest // pad_multiple) * pad_multiple)
    b = len(rows)
    x = np.full((b, width), PAD_ID, dtype=np.int64)
    y = np.full((b, width), PAD_ID, dtype=np.int64)
    mask = np.zeros((b, width), dtype=bool)
    plens = np.zeros((b, seq_len), dtype=np.int64)
    for i, (t, lens) in enumerate(rows):
        m = t.size - 1
        x[i, :m], y[i, :m], mask[i, :m] = t[:-1], t[1:], True
        plens[i, : lens.size] = lens
        plens[i, lens.size - 1] += width - m  # padding joins the last non-empty patch
    out = {"x": x, "y": y, "mask": mask, "patch_lengths": plens}
    check_patch_batch(out, seq_len, max_bytes)
    return out


def check_patch_batch(batch: dict, seq_len: int, max_bytes: int) -> None:
    """Assert the packing invariants of a patch batch; raises ``PackingError`` naming the broken one."""
    x, mask, pl = np.asarray(batch["x"]), np.asarray(batch["mask"]), np.asarray(batch["patch_lengths"])
    if pl.shape[1] != seq_len:
        raise PackingError(f"patch budget broken: {pl.shape[1]} patches per row, expected {seq_len}")
    if x.shape[1] > max_bytes:
        raise PackingError(f"byte cap broken: {x.shape[1]} bytes per row > {max_bytes}")
    if (pl[:, 0] != 1).any():
        raise PackingError(f"first patch of a row is not 1 byte: {pl[:, 0].tolist()}")
    if (pl.sum(1) != x.shape[1] + 1).any():
        raise PackingError(f"patch lengths sum to {pl.sum(1).tolist()}, expected len(x)+1 = {x.shape[1] + 1}")
    if (pl < 0).any():
        raise PackingError("negative patch length")
    nz = pl > 0  # zero-length patches may only trail
    if (nz[:, 1:] & ~nz[:, :-1]).any():
        raise PackingError("a zero-length patch is followed by a non-empty one")
    real = mask.sum(1)
    if (mask != (np.arange(x.shape[1])[None, :] < real[:, None])).any():
        raise PackingError("mask is not a prefix of real targets")


def iter_rows(packer) -> Iterator:
    while (row := packer.next_row()) is not None:
        yield row


__all__ = ["BytePacker", "DocSource", "PackState", "PackingError", "PatchPacker", "byte_batch",
           "check_patch_batch", "iter_rows", "patch_batch"]
