"""Patchers: from one document's tokens / next-byte entropies to patch lengths (pure numpy/torch, no I/O).

Conventions (``shared/docs/BLT_REFERENCE.md`` §2.3, ``docs/CONTRACTS.md``)
--------------------------------------------------------------------------
* A document is ``tokens = [BOS] + [b + 4 for b in data] + [EOS]`` (``blt_model.vocab``), ``N = len(tokens)``.
  ``entropies[i]`` is the entropy (nats) of the model's next-token distribution *after* token ``i``, so it
  describes the uncertainty about token ``i + 1``.
* "Start at t" means token ``t`` opens a new patch. **Positions 0 and 1 are always starts**: BOS is a patch of
  length 1 and the first byte opens patch 1. Every other decision at ``t >= 2`` uses only tokens ``< t`` and
  ``entropies[:t]`` (the entropy *predicting* token t is ``entropies[t - 1]``), so **every patcher here is
  incremental**: appending tokens never changes the patches already decided, and the patch starts of a prefix
  are exactly the patch starts of the whole sequence that fall inside the prefix.
* ``include_next_token=False`` (data preprocessing, the stored patch lengths): candidates are ``t in [2, N)``
  and the lengths sum to ``N``.
  ``include_next_token=True`` (generation / realtime patching): position ``N`` -- the token about to be
  generated -- is a candidate as well, decided from ``entropies[N - 1]``; the lengths sum to ``N + 1`` and the
  last patch tells whether the next token opens a new patch (last length 1 and a start rule fired at N) or
  extends the current one.
* Lengths are ``np.int32`` 1-D arrays, never zero-padded (``pad_patch_lengths`` pads a batch).

Modes
-----
* ``entropy``, global threshold (default): start at t iff ``H[t-1] > θ``.
* ``entropy``, approximate monotonic (``monotonic=True``): start at t iff ``H[t-1] - H[t-2] > θ``.
* ``entropy``, global + relative (``threshold_add`` set): start iff ``H[t-1] - H[t-2] > threshold_add`` and
  ``H[t-1] > θ``. Setting both ``monotonic`` and ``threshold_add`` is rejected (the reference silently lets
  ``monotonic`` win).
* ``space``: a byte is space-like if it is ASCII and not ``[0-9A-Za-z]``, or a UTF-8 lead byte ``>= 0xC0``
  (continuation bytes 0x80-0xBF are not); special ids count as space-like. A space-like token ends the current
  patch only if the token before it is not space-like; special ids always end a patch. Start at t iff token
  t-1 ends a patch. "a,  b" becomes ``[a,][␣␣b...]`` (SpaceByte-like, same as the reference).
* ``static``: BOS alone, then fixed-size patches of ``static_size`` from position 1 (the last one holds the
  remainder). Unlike the reference's static mode, the first patch is the lone BOS, as the contract requires.
* ``byte``: every token is its own patch.
* ``max_patch_length`` (any mode): a patch longer than m is split *from its start* into m, m, ..., remainder.
  Splitting from the start keeps it incremental.

Reference quirks (``reference_quirks``)
---------------------------------------
The official ``find_entropy_patch_start_ids`` always starts a patch at position 2 in the monotonic and
global+relative modes, and in global+relative never at position 3 (its mask is not updated as it goes). These
are artefacts, not design: position 2 has a well-defined rule (``H[1] - H[0]``). **By default we drop them**
(``reference_quirks=False``); pass ``reference_quirks=True`` to reproduce the official boundaries exactly,
e.g. for parity tests. The global-threshold mode has no quirk, so it matches the reference (and transformers'
``BltPatcher``) either way.

Bytes per patch (calibration, statistics)
-----------------------------------------
``bytes_per_patch = total tokens / total patches`` over a set of documents, with the stored lengths
(``include_next_token=False``): BOS and EOS count as positions and the lone-BOS patch counts as a patch. This is
the ratio the training stream sees -- packed rows are concatenations of these documents, so it is the number of
byte positions the local models process per global-model step, the quantity the paper's FLOP matching and
"average patch size" are about. For documents of a few KB it differs from "data bytes / non-BOS patches" by
well under 1%.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from blt_model.vocab import OFFSET

if TYPE_CHECKING:  # blt_pipeline.config imports blt_model.config; keep this module import-light
    from blt_pipeline.config import PatchConfig

PatchMode = Literal["entropy", "space", "static", "byte"]
MODES: tuple[str, ...] = ("entropy", "space", "static", "byte")

__all__ = [
    "MODES", "Patcher", "PatchMode", "bytes_per_patch", "byte_patch_lengths", "calibrate_threshold",
    "entropy_patch_lengths", "entropy_start_mask", "lengths_from_start_mask", "pad_patch_lengths",
    "patch_starts", "space_like", "space_patch_lengths", "space_start_mask", "split_long_patches",
    "static_patch_lengths", "static_start_mask",
]


# ------------------------------------------------------------------------------------------------ helpers
def _float_1d(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 1:
        raise ValueError(f"expected one document's 1-D entropies, got shape {a.shape}")
    return a


def _int_1d(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"expected one document's 1-D tokens, got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _check_rule(monotonic: bool, threshold_add: float | None) -> None:
    if monotonic and threshold_add is not None:
        raise ValueError("choose one entropy rule: monotonic=True or threshold_add (global + relative), not both")


def lengths_from_start_mask(mask: np.ndarray) -> np.ndarray:
    """Patch lengths (int32) from a boolean start mask whose first entry is True; they sum to ``len(mask)``."""
    if mask.size == 0:
        return np.zeros(0, dtype=np.int32)
    if not mask[0]:
        raise ValueError("position 0 must start a patch")
    starts = np.flatnonzero(mask)
    return np.diff(starts, append=mask.size).astype(np.int32)


def patch_starts(lengths) -> np.ndarray:
    """Start positions of patches given their lengths (inverse of ``lengths_from_start_mask``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.concatenate(([0], np.cumsum(lengths)[:-1])) if lengths.size else lengths


def split_long_patches(lengths, max_patch_length: int | None) -> np.ndarray:
    """Split every patch longer than m into m, m, ..., remainder (from the patch start). Vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_patch_length is None or lengths.size == 0 or lengths.max() <= max_patch_length:
        return lengths.astype(np.int32)
    m = int(max_patch_length)
    if m <= 0:
        raise ValueError(f"max_patch_length must be positive, got {m}")
    pieces = np.maximum((lengths + m - 1) // m, 1)
    out = np.full(int(pieces.sum()), m, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    out[last] = lengths - (pieces - 1) * m
    return out.astype(np.int32)


def _base_mask(n_tokens: int, include_next_token: bool) -> np.ndarray:
    total = n_tokens + int(include_next_token)
    mask = np.zeros(total, dtype=bool)
    mask[: min(2, total)] = True
    return mask


# ------------------------------------------------------------------------------------------------ entropy
def _entropy_scores(h: np.ndarray, total: int, monotonic: bool, threshold_add: float | None) -> tuple:
    """(value compared with θ, extra condition or None) for candidates t = 2 .. total-1."""
    prev = h[1: total - 1]  # H[t-1]
    if monotonic:
        return prev - h[: total - 2], None
    if threshold_add is not None:
        return prev, (prev - h[: total - 2]) > np.float32(threshold_add)
    return prev, None


def entropy_start_mask(
    entropies,
    threshold: float,
    *,
    monotonic: bool = False,
    threshold_add: float | None = None,
    include_next_token: bool = False,
    reference_quirks: bool = False,
) -> np.ndarray:
    """Boolean start mask of one document, length ``N`` (``N + 1`` with ``include_next_token``)."""
    _check_rule(monotonic, threshold_add)
    h = _float_1d(entropies)
    mask = _base_mask(h.size, include_next_token)
    total = mask.size
    if total > 2:
        score, extra = _entropy_scores(h, total, monotonic, threshold_add)
        cond = score > np.float32(threshold)
        if extra is not None:
            cond &= extra
        mask[2:] = cond
        if reference_quirks and (monotonic or threshold_add is not None):
            mask[2] = True
            if not monotonic and total > 3:
                mask[3] = False
    return mask


def entropy_patch_lengths(
    entropies,
    threshold: float,
    *,
    monotonic: bool = False,
    threshold_add: float | None = None,
    max_patch_length: int | None = None,
    include_next_token: bool = False,
    reference_quirks: bool = False,
) -> np.ndarray:
    """Patch lengths of one document from its entropies (one per token); see the module docstring."""
    mask = entropy_start_mask(
        entropies, threshold, monotonic=monotonic, threshold_add=threshold_add,
        include_next_token=include_next_token, reference_quirks=reference_quirks,
    )
    return split_long_patches(lengths_from_start_mask(mask), max_patch_length)


# ------------------------------------------------------------------------------------------------ space
_ALNUM = set(range(ord("0"), ord("9") + 1)) | set(range(ord("A"), ord("Z") + 1)) | set(range(ord("a"), ord("z") + 1))
_SPACE_LIKE_BYTE = np.array([(b < 0x80 and b not in _ALNUM) or b >= 0xC0 for b in range(256)], dtype=bool)


def space_like(tokens) -> np.ndarray:
    """Per token: ASCII non-alphanumeric byte, UTF-8 lead byte (>= 0xC0), or special id (< 4)."""
    t = _int_1d(tokens)
    out = np.ones(t.size, dtype=bool)
    byte = t >= OFFSET
    out[byte] = _SPACE_LIKE_BYTE[t[byte] - OFFSET]
    return out


def space_start_mask(tokens, *, include_next_token: bool = False) -> np.ndarray:
    """Start mask of the space patcher (reference ``find_space_patch_start_ids``)."""
    t = _int_1d(tokens)
    mask = _base_mask(t.size, include_next_token)
    total = mask.size
    if total > 2:
        sl = space_like(t[: total - 1])  # tokens 0 .. total-2 decide starts 1 .. total-1
        ends = sl.copy()
        ends[1:] &= ~sl[:-1]
        ends |= t[: total - 1] < OFFSET
        mask[2:] = ends[1:]
    return mask


def space_patch_lengths(tokens, *, max_patch_length: int | None = None, include_next_token: bool = False):
    return split_long_patches(
        lengths_from_start_mask(space_start_mask(tokens, include_next_token=include_next_token)), max_patch_length
    )


# ------------------------------------------------------------------------------------------------ static, byte
def static_start_mask(n_tokens: int, size: int, *, include_next_token: bool = False) -> np.ndarray:
    """BOS alone, then a start every ``size`` tokens from position 1."""
    if size <= 0:
        raise ValueError(f"static patch size must be positive, got {size}")
    mask = _base_mask(n_tokens, include_next_token)
    mask[1::size] = True
    return mask


def static_patch_lengths(
    n_tokens: int, size: int, *, max_patch_length: int | None = None, include_next_token: bool = False
) -> np.ndarray:
    mask = static_start_mask(n_tokens, size, include_next_token=include_next_token)
    return split_long_patches(lengths_from_start_mask(mask), max_patch_length)


def byte_patch_lengths(n_tokens: int, *, include_next_token: bool = False) -> np.ndarray:
    return np.ones(n_tokens + int(include_next_token), dtype=np.int32)


# ------------------------------------------------------------------------------------------------ batches
def pad_patch_lengths(rows: Sequence, dtype=torch.long) -> torch.Tensor:
    """Right-pad per-row patch lengths with zeros into a ``[B, P_max]`` tensor (zeros never precede a length)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(np.asarray(r), dtype=dtype)
    return out


def bytes_per_patch(lengths_seqs: Iterable) -> float:
    """Total tokens / total patches over documents (BOS, EOS and the BOS patch included; module docstring)."""
    tokens = patches = 0
    for lengths in lengths_seqs:
        lengths = np.asarray(lengths)
        tokens += int(lengths.sum())
        patches += int(lengths.size)
    return tokens / patches if patches else float("nan")


# ------------------------------------------------------------------------------------------------ Patcher
@dataclass(frozen=True)
class Patcher:
    """One patching rule with its parameters; ``Patcher.from_config(cfg.patch, threshold=θ)``.

    ``patch_lengths(tokens=..., entropies=..., include_next_token=...)`` patches one document (1-D inputs);
    entropy mode needs ``entropies`` (one per token), the other modes need ``tokens`` (static and byte only
    their count). ``patch_batch`` does the same for equal-length rows ``[B, L]`` and returns a zero-padded
    ``LongTensor [B, P]`` (the form ``BLT.forward`` takes).
    """

    mode: PatchMode = "entropy"
    threshold: float | None = None
    monotonic: bool = False
    threshold_add: float | None = None
    max_patch_length: int | None = None
    static_size: int = 4
    reference_quirks: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown patching mode {self.mode!r}; expected one of {MODES}")
        if self.mode == "entropy":
            _check_rule(self.monotonic, self.threshold_add)

    @classmethod
    def from_config(cls, cfg: PatchConfig, threshold: float | None = None, **overrides) -> Patcher:
        """From ``PatchConfig``; ``threshold`` (e.g. a calibrated θ) replaces ``cfg.threshold`` when given."""
        fields = dict(
            mode=cfg.mode, threshold=cfg.threshold if threshold is None else float(threshold),
            monotonic=cfg.monotonic, threshold_add=cfg.threshold_add, max_patch_length=cfg.max_patch_length,
            static_size=cfg.static_size,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def needs_entropies(self) -> bool:
        return self.mode == "entropy"

    def patch_lengths(self, tokens=None, entropies=None, *, include_next_token: bool = False) -> np.ndarray:
        """Patch lengths (int32) of one document; sum ``N`` (``N + 1`` with ``include_next_token``)."""
        if self.mode == "entropy":
            if entropies is None:
                raise ValueError("entropy patching needs the document's entropies")
            if self.threshold is None:
                raise ValueError("entropy patching needs a threshold (set patch.threshold or calibrate)")
            return entropy_patch_lengths(
                entropies, self.threshold, monotonic=self.monotonic, threshold_add=self.threshold_add,
                max_patch_length=self.max_patch_length, include_next_token=include_next_token,
                reference_quirks=self.reference_quirks,
            )
        if tokens is None:
            if entropies is None:
                raise ValueError(f"{self.mode} patching needs the document's tokens")
            if self.mode == "space":
                raise ValueError("space patching needs the document's tokens")
            n = len(entropies)
        else:
            n = len(tokens)
        if self.mode == "space":
            return space_patch_lengths(
                tokens, max_patch_length=self.max_patch_length, include_next_token=include_next_token
            )
        if self.mode == "static":
            return static_patch_lengths(
                n, self.static_size, max_patch_length=self.max_patch_length, include_next_token=include_next_token
            )
        return byte_patch_lengths(n, include_next_token=include_next_token)

    def patch_batch(self, tokens=None, entropies=None, *, include_next_token: bool = False) -> torch.Tensor:
        """Patch every row of ``[B, L]`` tokens/entropies independently; zero-padded ``LongTensor [B, P]``."""
        ref = tokens if tokens is not None else entropies
        if ref is None:
            raise ValueError("patch_batch needs tokens or entropies")
        rows = [
            self.patch_lengths(
                None if tokens is None else tokens[i], None if entropies is None else entropies[i],
                include_next_token=include_next_token,
            )
            for i in range(len(ref))
        ]
        return pad_patch_lengths(rows)


# ------------------------------------------------------------------------------------------------ calibration
class _CalibrationSample:
    """Entropy sequences flattened once, so each bisection step is a few vectorised numpy passes."""

    def __init__(self, seqs, monotonic, threshold_add, max_patch_length, reference_quirks):
        scores, cand_pos = [], []
        self.tokens = 0
        self.fixed = 0  # starts that do not depend on θ (positions 0, 1 and the quirks)
        forced = []  # per doc: global positions of forced starts (for max_patch_length)
        self.max_patch_length = max_patch_length
        offset = 0
        for h in seqs:
            h = _float_1d(h)
            n = h.size
            if n == 0:
                continue
            self.tokens += n
            forced_local = [0] + ([1] if n > 1 else [])
            if n > 2:
                s, extra = _entropy_scores(h, n, monotonic, threshold_add)
                keep = np.ones(n - 2, dtype=bool) if extra is None else extra.copy()
                if reference_quirks and (monotonic or threshold_add is not None):
                    keep[0] = False
                    forced_local.append(2)
                    if not monotonic and n > 3:
                        keep[1] = False
                scores.append(s[keep])
                cand_pos.append(offset + 2 + np.flatnonzero(keep))
            forced.append(offset + np.asarray(forced_local))
            self.fixed += len(forced_local)
            offset += n
        self.total = offset
        self.scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        self.cand_pos = np.concatenate(cand_pos) if cand_pos else np.zeros(0, np.int64)
        self.forced_pos = np.concatenate(forced) if forced else np.zeros(0, np.int64)

    def patches(self, threshold: float) -> int:
        above = self.scores > np.float32(threshold)
        if self.max_patch_length is None:
            return self.fixed + int(above.sum())
        # document starts are forced starts, so one global start mask splits correctly at doc boundaries
        mask = np.zeros(self.total, dtype=bool)
        mask[self.forced_pos] = True
        mask[self.cand_pos[above]] = True
        lengths = np.diff(np.flatnonzero(mask), append=self.total)
        m = self.max_patch_length
        return int(((lengths + m - 1) // m).sum())

    def bytes_per_patch(self, threshold: float) -> float:
        return self.tokens / max(self.patches(threshold), 1)


def calibrate_threshold(
    entropy_seqs: Iterable,
    target_bytes_per_patch: float,
    *,
    monotonic: bool = False,
    threshold_add: float | None = None,
    max_patch_length: int | None = None,
    reference_quirks: bool = False,
    tol: float = 0.05,
    iters: int = 64,
    return_achieved: bool = False,
):
    """θ whose mean bytes per patch (``bytes_per_patch``) over ``entropy_seqs`` is closest to the target.

    Bisection over θ: bytes per patch never decreases as θ grows (fewer rule starts; splitting by
    ``max_patch_length`` keeps that order). The patch count is a step function of θ, so the result is the
    side of the final step nearest the target; a warning is raised if it is more than ``tol`` (relative) away
    (e.g. the sample is too small, or ``max_patch_length`` caps the ratio). θ is rounded to float32, the
    precision in which patchers compare. Entropy sequences are 1-D, one per document (use the float16-rounded
    values if that is what is stored, so the calibrated decisions equal the stored ones). With
    ``return_achieved`` the result is ``(θ, achieved bytes per patch)``.
    """
    _check_rule(monotonic, threshold_add)
    if target_bytes_per_patch <= 1:
        raise ValueError(f"target_bytes_per_patch must be > 1, got {target_bytes_per_patch}")
    sample = _CalibrationSample(entropy_seqs, monotonic, threshold_add, max_patch_length, reference_quirks)
    if sample.tokens == 0:
        raise ValueError("calibration needs at least one non-empty entropy sequence")
    if sample.scores.size:
        lo = float(sample.scores.min()) - 1.0  # every candidate starts: fewest bytes per patch
        hi = float(sample.scores.max()) + 1.0  # no candidate starts: most bytes per patch
    else:
        lo, hi = -1.0, 1.0
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    lo, hi = f32(lo), f32(hi)
    b_lo, b_hi = sample.bytes_per_patch(lo), sample.bytes_per_patch(hi)
    if target_bytes_per_patch <= b_lo:
        best = lo
    elif target_bytes_per_patch >= b_hi:
        best = hi
    else:
        for _ in range(iters):  # invariant: bpp(lo) < target <= bpp(hi)
            mid = f32((lo + hi) / 2)
            if mid in (lo, hi):
                break
            if sample.bytes_per_patch(mid) < target_bytes_per_patch:
                lo = mid
            else:
                hi = mid
        b_lo, b_hi = sample.bytes_per_patch(lo), sample.bytes_per_patch(hi)
        best = lo if abs(b_lo - target_bytes_per_patch) < abs(b_hi - target_bytes_per_patch) else hi
    achieved = sample.bytes_per_patch(best)
    if not math.isfinite(achieved) or abs(achieved - target_bytes_per_patch) > tol * target_bytes_per_patch:
        warnings.warn(
            f"calibrated θ={best:.6g} gives {achieved:.3f} bytes/patch, more than {tol:.0%} from the target "
            f"{target_bytes_per_patch} ({sample.tokens} tokens sampled)",
            RuntimeWarning, stacklevel=2,
        )
    return (best, achieved) if return_achieved else best
