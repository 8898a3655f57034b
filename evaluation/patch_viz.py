"""Patch pictures: where the entropy model cuts a text into patches (HTML + PNG, like the paper's Fig. 4).

``blt show-patches --checkpoint DIR --text "..." [--threshold θ] --out patches`` writes ``patches.html``
(the text with one framed segment per patch, every byte shaded by the entropy of its own prediction,
non-UTF-8 bytes and control bytes shown escaped as ``\\xNN``) and ``patches.png`` (entropy per byte, the
threshold line, a vertical line at each patch start).

Conventions: the text is scored as ``[BOS] + bytes`` (no EOS; a prompt-like prefix). ``entropies[i]`` is the
entropy (nats) after token ``i``; byte ``t`` is token ``t + 1``, so the entropy *predicting* byte ``t`` is
``entropies[t]`` -- the value the patcher compares with θ to decide whether byte ``t`` opens a patch. The
lone-BOS patch is not shown; every other patch is one segment, and the segments concatenate to the input.

``--checkpoint`` may be an entropy model (stage dir or model.pt) or a ``train_blt`` stage dir: then the
entropy model and the patcher settings (mode, θ) come from the manifests of the stages it was built from.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blt_model.vocab import BOS_ID, OFFSET


# ------------------------------------------------------------------------------------- stage resolution
def _read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def stage_dir_of(path: str | Path) -> Path:
    """The stage directory of a stage dir or of a file inside it (``model.pt``)."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def upstream_dir(stage_dir: str | Path, stage: str) -> Path | None:
    """Directory of upstream ``stage`` named in ``stage_dir``'s manifest inputs (transitively), if it exists.

    Stage dirs are ``<workdir>/<stage>/<key[:16]>``, so the workdir is two levels up.
    """
    stage_dir = Path(stage_dir)
    seen: set[Path] = set()
    todo = [stage_dir]
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        m = _read_json(d / "manifest.json")
        inputs = m.get("inputs") or {}
        workdir = d.parent.parent
        for name, key in inputs.items():
            if not isinstance(key, str):
                continue
            cand = workdir / name / key[:16]
            if name == stage and (cand / "manifest.json").exists():
                return cand
            if cand.exists():
                todo.append(cand)
    return None


@dataclass
class PatchSettings:
    """What the patch stage used: a ``Patcher`` plus where it came from (for captions)."""

    patcher: object
    source: str


def patch_settings(patch_dir: str | Path | None, threshold: float | None = None) -> PatchSettings:
    """The patcher of a patch stage dir (its config and calibrated θ); ``threshold`` overrides θ.

    Without a patch dir: an entropy patcher with ``threshold`` (required).
    """
    from blt_model.patching import Patcher
    from blt_pipeline.config import PatchConfig

    if patch_dir is not None:
        m = _read_json(Path(patch_dir) / "manifest.json")
        cfg = PatchConfig.model_validate(m.get("config") or {})
        theta = threshold if threshold is not None else _manifest_threshold(m)
        if cfg.mode == "entropy" and theta is None:
            raise ValueError(f"{patch_dir}: the patch manifest records no threshold; pass --threshold")
        return PatchSettings(Patcher.from_config(cfg, threshold=theta), f"patch stage {Path(patch_dir).name}")
    if threshold is None:
        raise ValueError("no patch stage found for this checkpoint: pass --threshold")
    return PatchSettings(Patcher(mode="entropy", threshold=float(threshold)), "--threshold")


def _manifest_threshold(m: dict) -> float | None:
    for holder in (m.get("summary") or {}, m, m.get("config") or {}):
        for k in ("threshold", "theta", "calibrated_threshold"):
            v = holder.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                return float(v)
    return None


def resolve_entropy_and_patch(checkpoint: str | Path, threshold: float | None = None):
    """``(entropy model, its config, PatchSettings)`` for a checkpoint of any kind.

    An entropy/baseline model file is used as is (θ from a patch stage that used it is not discoverable, so
    ``threshold`` is needed unless a manifest names one). A BLT checkpoint resolves to the entropy model and
    patch settings of its ``patch`` input.
    """
    from training.artifacts import load_model

    model, config, kind = load_model(checkpoint)
    sdir = stage_dir_of(checkpoint)
    if kind == "blt":
        patch_dir = upstream_dir(sdir, "patch")
        ent_dir = upstream_dir(sdir, "train_entropy")
        if ent_dir is None:
            raise FileNotFoundError(
                f"{checkpoint} is a BLT; its entropy model was not found through the manifests' inputs "
                "(pass the train_entropy stage dir instead)")
        model, config, _ = load_model(ent_dir)
        return model, config, patch_settings(patch_dir, threshold)
    return model, config, patch_settings(None if threshold is not None else _patch_dir_for_entropy(sdir),
                                         threshold)


def _patch_dir_for_entropy(entropy_dir: Path) -> Path | None:
    """A complete patch stage dir whose inputs name this entropy stage (newest first), if any."""
    m = _read_json(entropy_dir / "manifest.json")
    key = m.get("key")
    if not key:
        return None
    root = entropy_dir.parent.parent / "patch"
    cands = sorted(root.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime, reverse=True) if root.exists() else []
    for c in cands:
        pm = _read_json(c)
        if (pm.get("inputs") or {}).get("train_entropy") == key and pm.get("complete"):
            return c.parent
    return None


# ------------------------------------------------------------------------------------- entropies
@torch.no_grad()
def token_entropies(model: torch.nn.Module, tokens, chunk_len: int | None = None) -> np.ndarray:
    """Entropy (nats, fp32) of the next-token distribution after every token of one sequence.

    Long sequences are scored in chunks of ``chunk_len`` that overlap by the model's window, so every
    position sees the same context as in one pass (sliding-window attention).
    """
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long).view(1, -1)
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    window = int(getattr(cfg, "window", 512) or 512)
    max_len = chunk_len or int(getattr(cfg, "max_seqlen", 8192) or 8192)
    if hasattr(model, "entropies"):  # ByteLM: streams long inputs through its rolling cache
        try:
            return np.asarray(model.entropies(ids, chunk_len=max_len)[0].float().cpu().numpy(), dtype=np.float32)
        except TypeError:
            pass
    max_len = max(max_len, window + 1)
    L = ids.shape[1]
    out = torch.empty(L, dtype=torch.float32)
    start = 0
    while start < L:
        ctx = max(0, start - window + 1) if start else 0
        end = min(L, ctx + max_len)
        logits = _logits(model, ids[:, ctx:end]).float()[0]
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        out[start:end] = ent[start - ctx:]
        start = end
    return out.numpy()


def _logits(model, ids):
    out = model(ids)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    return out


# ------------------------------------------------------------------------------------- segments
def segments(data: bytes, patch_lengths) -> list[bytes]:
    """The byte segments of the patches of ``[BOS] + data`` (lengths sum to ``len(data) + 1``, first = BOS).

    Lengths summing to ``len(data) + 2`` (an EOS, or the next-byte slot) are accepted; the trailing position
    is dropped. One segment per patch that holds at least one byte of ``data``.
    """
    lengths = [int(x) for x in np.asarray(patch_lengths).reshape(-1) if int(x) > 0]
    if not lengths or lengths[0] != 1:
        raise ValueError("the first patch must be the lone BOS (length 1)")
    total = sum(lengths)
    if total not in (len(data) + 1, len(data) + 2):
        raise ValueError(f"patch lengths sum to {total}, expected {len(data) + 1} for {len(data)} bytes")
    out, pos = [], 0
    for n in lengths[1:]:
        seg = data[pos:pos + n]
        if seg:
            out.append(bytes(seg))
        pos += n
    return out


def _char_units(seg: bytes) -> list[tuple[bytes, str | None]]:
    """Split a segment into (bytes, display text) units: whole UTF-8 characters, or single bytes to escape."""
    units: list[tuple[bytes, str | None]] = []
    i = 0
    while i < len(seg):
        b = seg[i]
        n = 1 if b < 0x80 else 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 0
        if n:
            chunk = seg[i:i + n]
            try:
                ch = chunk.decode("utf-8") if len(chunk) == n else None
            except UnicodeDecodeError:
                ch = None
            if ch is not None:
                units.append((chunk, ch))
                i += n
                continue
        units.append((seg[i:i + 1], None))
        i += 1
    return units


def _display(ch: str | None, raw: bytes) -> tuple[str, bool]:
    """(HTML-escaped display text, escaped?) for one unit."""
    if ch is None:
        return f"\\x{raw[0]:02x}", True
    if ch == "\n":
        return "↵\n", False
    if ch == "\t":
        return "→\t", False
    if ch == " ":
        return " ", False
    o = ord(ch)
    if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0:
        return (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"), True
    return html.escape(ch), False


def _shade(h: float, hmin: float, hmax: float) -> str:
    span = hmax - hmin
    a = 0.0 if span <= 0 or not math.isfinite(h) else max(0.0, min(1.0, (h - hmin) / span))
    return f"rgba(230,80,30,{0.08 + 0.72 * a:.3f})"


@dataclass
class PatchPicture:
    """One scored text: its bytes, per-byte entropies (predicting each byte), patch lengths (BOS first)."""

    data: bytes
    entropies: np.ndarray  # [len(data)]: entropy predicting byte t
    patch_lengths: np.ndarray  # over [BOS] + data, first = 1
    threshold: float | None = None
    caption: str = ""

    @property
    def segments(self) -> list[bytes]:
        return segments(self.data, self.patch_lengths)

    @property
    def bytes_per_patch(self) -> float:
        n = len(self.segments)
        return len(self.data) / n if n else float("nan")


def picture(model, patcher, data: bytes | str, caption: str = "", chunk_len: int | None = None) -> PatchPicture:
    """Score ``data`` with the entropy model and patch it with ``patcher`` (a ``blt_model.patching.Patcher``)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    tokens = np.concatenate(([BOS_ID], np.frombuffer(data, dtype=np.uint8).astype(np.int64) + OFFSET))
    ent = token_entropies(model, tokens, chunk_len) if model is not None else None
    lengths = patcher.patch_lengths(tokens=tokens, entropies=ent, include_next_token=False)
    per_byte = np.asarray(ent[: len(data)], dtype=np.float32) if ent is not None else np.zeros(len(data), np.float32)
    return PatchPicture(data, per_byte, np.asarray(lengths), getattr(patcher, "threshold", None), caption)


# ------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
.pic { margin-bottom: 2em; }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.9; font-size: 14px; }
.p { border: 1px solid #335; border-radius: 3px; padding: 0 1px; margin-right: 1px; }
.p:nth-child(even) { border-color: #558; }
.b { }
.esc { color: #0050b0; font-style: italic; }
.legend { color: #555; font-size: 12px; }
"""


def picture_html_fragment(pic: PatchPicture, index: int = 0) -> str:
    """One ``<div class="pic">``: a caption and the text with ``<span class="p" data-hex=...>`` per patch."""
    segs = pic.segments
    hmin = float(np.nanmin(pic.entropies)) if pic.entropies.size else 0.0
    hmax = float(np.nanmax(pic.entropies)) if pic.entropies.size else 1.0
    if pic.threshold is not None and math.isfinite(pic.threshold):
        hmin, hmax = min(hmin, float(pic.threshold)), max(hmax, float(pic.threshold))
    parts = []
    pos = 0
    for j, seg in enumerate(segs, 1):
        inner = []
        for raw, ch in _char_units(seg):
            h = float(np.max(pic.entropies[pos:pos + len(raw)]))
            text, esc = _display(ch, raw)
            cls = "b esc" if esc else "b"
            title = f"byte {pos}: H={h:.3f}"
            inner.append(f'<span class="{cls}" style="background:{_shade(h, hmin, hmax)}" title="{title}">{text}</span>')
            pos += len(raw)
        parts.append(f'<span class="p" data-patch="{j}" data-hex="{seg.hex()}">{"".join(inner)}</span>')
    theta = "-" if pic.threshold is None else f"{pic.threshold:.4g}"
    cap = html.escape(pic.caption)
    return (
        f'<div class="pic" id="pic{index}"><h3>{cap}</h3>'
        f'<p class="legend">{len(pic.data)} bytes, {len(segs)} patches, '
        f"{pic.bytes_per_patch:.2f} bytes/patch, θ = {theta}; "
        f"shading = entropy (nats) of each byte's prediction, light {hmin:.2f} to dark {hmax:.2f}; "
        f"framed spans = patches; "
        f"<span class=esc>\\xNN</span> = byte that is not (complete) UTF-8 inside its patch</p>"
        f'<div class="text">{"".join(parts)}</div></div>'
    )


def pictures_html(pics: list[PatchPicture], title: str = "BLT patches") -> str:
    body = "\n".join(picture_html_fragment(p, i) for i, p in enumerate(pics))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>\n")


def parse_html_segments(text: str) -> list[list[bytes]]:
    """Per picture, the byte segments recorded in the HTML's ``data-hex`` attributes (for tests and tools)."""
    import re

    out = []
    for block in re.split(r'<div class="pic"', text)[1:]:
        out.append([bytes.fromhex(h) for h in re.findall(r'class="p" data-patch="\d+" data-hex="([0-9a-f]*)"', block)])
    return out


# ------------------------------------------------------------------------------------- PNG
def plot_picture(pic: PatchPicture, out: str | Path, max_bytes: int = 160) -> Path:
    """Entropy per byte (first ``max_bytes``), the threshold, and a dashed line at each patch start."""
    from evaluation.plots import pyplot, save_png

    plt = pyplot()
    n = min(len(pic.data), max_bytes)
    width = min(max(6.0, 0.12 * n + 2), 22.0)
    fig, ax = plt.subplots(figsize=(width, 3.6), dpi=100)
    xs = np.arange(n)
    ax.plot(xs, pic.entropies[:n], marker="o", markersize=2.5, linewidth=1, color="#c04010", label="entropy H")
    if pic.threshold is not None and math.isfinite(pic.threshold):
        ax.axhline(pic.threshold, color="#1060c0", linestyle="-", linewidth=1, label=f"θ = {pic.threshold:.3g}")
    starts = np.cumsum(np.asarray(pic.patch_lengths[:-1], dtype=np.int64)) - 1  # token pos -> byte pos
    for s in starts[(starts >= 0) & (starts < n)]:
        ax.axvline(s - 0.5, color="#777", linestyle="--", linewidth=0.6)
    if n <= 160:
        labels = []
        for b in pic.data[:n]:
            c = chr(b)
            labels.append("␣" if c == " " else "↵" if c == "\n" else c if 0x21 <= b < 0x7F else f"{b:02x}")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7, family="monospace")
    else:
        ax.set_xlabel("byte")
    ax.set_ylabel("entropy (nats)")
    more = f" (first {n} of {len(pic.data)} bytes)" if n < len(pic.data) else ""
    ax.set_title((pic.caption or "entropy per byte") + more, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlim(-1, max(n, 1))
    fig.tight_layout()
    return save_png(fig, out)


def write_pictures(pics: list[PatchPicture], prefix: str | Path, title: str = "BLT patches") -> dict[str, Path]:
    """``<prefix>.html`` with every picture, ``<prefix>.png`` (first) and ``<prefix>-<i>.png`` (others)."""
    from blt_pipeline.stage import atomic_write_text

    prefix = Path(prefix)
    out = {"html": prefix.with_name(prefix.name + ".html")}
    atomic_write_text(out["html"], pictures_html(pics, title))
    for i, p in enumerate(pics):
        name = f"{prefix.name}.png" if i == 0 else f"{prefix.name}-{i}.png"
        out[f"png{i}" if i else "png"] = plot_picture(p, prefix.with_name(name))
    return out


def cli(args) -> int:
    if (args.text is None) == (args.file is None):
        raise ValueError("pass exactly one of --text or --file")
    data = args.text.encode("utf-8") if args.text is not None else Path(args.file).read_bytes()
    with torch.no_grad():
        model, _cfg, settings = resolve_entropy_and_patch(args.checkpoint, args.threshold)
        cap = f"{args.file or 'text'} — {settings.source}"
        pic = picture(model, settings.patcher, data, caption=cap)
    files = write_pictures([pic], args.out)
    print(f"{len(data)} bytes -> {len(pic.segments)} patches ({pic.bytes_per_patch:.2f} bytes/patch, "
          f"θ={pic.threshold})")
    for f in files.values():
        print(f"wrote {f}")
    return 0
