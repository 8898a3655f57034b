"""Stage ``evaluate``: BLT vs a FLOP-matched byte-level baseline on the validation split.

``run_evaluate(cfg, ingest, entropy, patch, blt) -> result`` (key config ``cfg.eval``; inputs: the keys of
``ingest``, ``train_entropy``, ``patch``, ``train_blt``). Writes into its stage directory:

* ``metrics.json``: every number below; ``report.md``: the human summary (the pipeline's Prefect markdown
  artifact links it; the result dict carries ``report``, the absolute path);
* ``val_bpb_vs_flops.png``: validation BPB against training FLOPs of both models (from their
  ``metrics.jsonl``; x = bytes seen x training FLOPs per byte);
* ``patches.html`` / ``patches.png`` (+ ``patches-<i>.png``): patch pictures of ``cfg.eval.samples`` val docs
  (stored entropies and patch lengths, i.e. exactly what the BLT trained on);
* ``generation.txt``: a greedy sample after ``cfg.eval.prompt`` (incremental decoding);
* ``wandb/``: an offline (or online) W&B run, group = pipeline run, ``job_type="evaluate"``, with the
  pictures as a ``wandb.Table`` and the headline metrics.

Numbers (``evaluation.bpb`` for the scoring rules):

* **val BPB** of the BLT, overall and per source, on the first ``cfg.eval.max_val_bytes`` target bytes of
  the val split, with the patch stage's stored patch lengths, rows packed like training;
* **bytes/patch**: tokens / patches over the scored docs (the patch stage's definition) and the patch
  stage's own mean over all shards;
* **FLOPs** (``blt_model.flops``, analytic): BLT inference FLOPs per byte (forward) at the training
  distribution's patch size and row length, the entropy model's per byte (patching cost at inference),
  training FLOPs = training FLOPs per byte x bytes seen;
* **baseline** (unless ``cfg.eval.baseline`` is false): a ``ByteLM`` of shape ``cfg.eval.baseline_model``
  trained by ``training.blt_stage.run_train_baseline`` on the same shards for
  ``round(BLT training FLOPs / (baseline training FLOPs per byte x bytes per step))`` steps, so both used the
  same training compute; scored on exactly the same targets.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blt_pipeline.config import PipelineConfig
from blt_pipeline.stage import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_manifest,
    run_stage,
    stage_key,
)

STAGE = "evaluate"
VERSION = "1"
PICTURE_BYTES = 1200  # bytes of each sample document shown in the patch pictures
log = logging.getLogger(__name__)


def _inputs(ingest: dict, entropy: dict, patch: dict, blt: dict) -> dict[str, str]:
    return {"ingest": ingest["key"], "train_entropy": entropy["key"], "patch": patch["key"], "train_blt": blt["key"]}


def key_for(cfg: PipelineConfig, ingest: dict, entropy: dict, patch: dict, blt: dict) -> str:
    """The stage key ``run_evaluate`` will use (for Prefect's cache), without running anything."""
    return stage_key(STAGE, cfg.eval, _inputs(ingest, entropy, patch, blt), VERSION)


def run_evaluate(cfg: PipelineConfig, ingest: dict, entropy: dict, patch: dict, blt: dict) -> dict[str, Any]:
    """Evaluate (or reuse) ; returns the stage result dict plus ``report`` (absolute path of report.md)."""
    inputs = _inputs(ingest, entropy, patch, blt)
    key = stage_key(STAGE, cfg.eval, inputs, VERSION)
    res = run_stage(STAGE, cfg.workdir, cfg.eval, inputs, VERSION,
                    lambda out: build_evaluate(Path(out), cfg, key, ingest, entropy, patch, blt))
    res["report"] = str(Path(res["dir"]) / "report.md")
    return res


# ============================================================================================ helpers
def _manifest(stage_result: dict) -> dict:
    try:
        return json.loads(Path(stage_result["manifest"]).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return json.loads((Path(stage_result["dir"]) / "manifest.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return {}


def _summary(stage_result: dict) -> dict:
    return stage_result.get("summary") or _manifest(stage_result).get("summary") or {}


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def _row_bytes(cfg: PipelineConfig) -> int:
    bt = cfg.blt.train
    return bt.max_bytes_per_row or bt.seq_len * 8


def blt_flops(cfg: PipelineConfig, bytes_per_patch: float) -> dict[str, float]:
    """BLT FLOPs per byte at the training rows' shape: ``seq_len`` patches of ``bytes_per_patch``, capped."""
    from blt_model.flops import blt_flops_per_byte

    seq_bytes = min(float(_row_bytes(cfg)), cfg.blt.train.seq_len * bytes_per_patch)
    return blt_flops_per_byte(cfg.blt.model, bytes_per_patch, seq_bytes)


def baseline_plan(cfg: PipelineConfig, blt_train_flops: float) -> dict[str, Any]:
    """Steps for the baseline so that its training FLOPs match ``blt_train_flops``."""
    from blt_model.flops import bytelm_flops_per_byte
    from training.run import baseline_setup

    model_cfg, train_cfg = baseline_setup(cfg)
    per_byte = bytelm_flops_per_byte(model_cfg, train_cfg.seq_len)
    bytes_per_step = train_cfg.batch_size * train_cfg.seq_len * train_cfg.devices * train_cfg.num_nodes
    steps = max(1, int(round(blt_train_flops / (per_byte["total_train"] * bytes_per_step))))
    return {"steps": steps, "seq_len": train_cfg.seq_len, "bytes_per_step": bytes_per_step,
            "train_flops_per_byte": per_byte["total_train"], "inference_flops_per_byte": per_byte["total_forward"],
            "model": json.loads(model_cfg.model_dump_json())}


def _n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _pick_samples(docs, n: int):
    """Up to ``n`` docs, round-robin over sources (so every source is shown when n allows)."""
    by_src: dict[str, list] = {}
    for d in docs:
        if d.patch_lengths is not None and d.entropies is not None and len(d.data):
            by_src.setdefault(d.source, []).append(d)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_src.values()):
        for v in by_src.values():
            if i < len(v) and len(out) < n:
                out.append(v[i])
        i += 1
    return out


def sample_pictures(docs, threshold: float | None, n: int):
    """``PatchPicture`` of the first ``PICTURE_BYTES`` bytes of ``n`` val docs (stored entropies/patches)."""
    from evaluation.bpb import truncate_lengths
    from evaluation.patch_viz import PatchPicture

    pics = []
    for d in _pick_samples(docs, n):
        k = min(len(d.data), PICTURE_BYTES)
        lengths = truncate_lengths(d.patch_lengths, k + 1)
        cap = f"{d.doc_id} ({d.source})" + (f", first {k} of {len(d.data)} bytes" if k < len(d.data) else "")
        pics.append(PatchPicture(d.data[:k], np.asarray(d.entropies[:k], dtype=np.float32), lengths, threshold,
                                 cap))
    return pics


# ============================================================================================ build
def build_evaluate(out: Path, cfg: PipelineConfig, key: str, ingest: dict, entropy: dict, patch: dict,
                   blt: dict) -> dict[str, Any]:
    from blt_model.generation import generate
    from blt_model.patching import Patcher
    from evaluation.bpb import iter_val_docs, score_blt, score_bytelm, take_bytes
    from evaluation.compare import load_curve
    from evaluation.patch_viz import write_pictures
    from training.artifacts import load_model

    started = time.perf_counter()
    ecfg = cfg.eval
    blt_model, blt_cfg, _ = load_model(blt["dir"])
    ent_model, _, _ = load_model(entropy["dir"])
    psum = _summary(patch)
    threshold = _finite(psum.get("threshold"))
    patcher = Patcher.from_config(cfg.patch, threshold=threshold)
    sources = sorted((read_manifest(ingest["dir"]) or {}).get("sources", {})) or None
    docs = take_bytes(iter_val_docs(ingest["dir"], patch["dir"]), ecfg.max_val_bytes, sources)
    if not docs:
        raise ValueError(f"{ingest['dir']}: the val split has no documents to evaluate on "
                         "(raise data.val_fraction)")
    bt = cfg.blt.train
    t0 = time.perf_counter()
    blt_score = score_blt(blt_model, docs, bt.seq_len, _row_bytes(cfg), batch_size=bt.batch_size)
    blt_secs = time.perf_counter() - t0
    bpp_val = blt_score.tokens / max(blt_score.patches, 1)
    bpp_train = _finite(psum.get("mean_bytes_per_patch")) or bpp_val
    bflops = blt_flops(cfg, bpp_train)
    from blt_model.flops import bytelm_flops_per_byte

    ent_flops = bytelm_flops_per_byte(cfg.entropy.model, min(cfg.patch.chunk_len, cfg.entropy.model.max_seqlen))
    bsum = _summary(blt)
    blt_bytes_seen = _finite(bsum.get("bytes_seen")) or 0.0
    blt_train_flops = bflops["total_train"] * blt_bytes_seen
    metrics: dict[str, Any] = {
        "val_docs": len(docs), "val_bytes": blt_score.n,
        "val_sources": blt_score.source_bytes(),
        "blt": {
            "val_bpb": blt_score.bpb, "val_bpb_by_source": blt_score.source_bpb(),
            "bytes_per_patch_val": bpp_val, "bytes_per_patch_train": bpp_train,
            "threshold": threshold, "patch_mode": cfg.patch.mode,
            "inference_flops_per_byte": bflops["total_forward"],
            "inference_flops_per_byte_with_entropy_model": bflops["total_forward"] + ent_flops["total_forward"],
            "train_flops_per_byte": bflops["total_train"], "bytes_seen": blt_bytes_seen,
            "train_flops": blt_train_flops, "steps": bsum.get("steps"), "params": _n_params(blt_model),
            "flops_breakdown": {k: bflops[k] for k in ("encoder", "global", "decoder", "cross_attention", "head")},
            "score_seconds": round(blt_secs, 3), "train_val_bpb": _finite(bsum.get("val_bpb")),
        },
        "entropy_model": {"inference_flops_per_byte": ent_flops["total_forward"], "params": _n_params(ent_model)},
    }
    curves = {"BLT": (load_curve(Path(blt["dir"]) / "metrics.jsonl", "BLT"), bflops["total_train"])} \
        if (Path(blt["dir"]) / "metrics.jsonl").exists() else {}

    # ---- baseline
    base_res = None
    if ecfg.baseline:
        from training import blt_stage

        plan = baseline_plan(cfg, blt_train_flops)
        log.info("evaluate: baseline for %d steps (%.3g training FLOPs to match)", plan["steps"], blt_train_flops)
        base_res = blt_stage.run_train_baseline(cfg, ingest, plan["steps"])
        base_model, _, _ = load_model(base_res["dir"])
        t0 = time.perf_counter()
        base_score = score_bytelm(base_model, docs, plan["seq_len"], batch_size=bt.batch_size)
        base_sum = _summary(base_res)
        base_bytes = _finite(base_sum.get("bytes_seen")) or plan["steps"] * plan["bytes_per_step"]
        metrics["baseline"] = {
            "val_bpb": base_score.bpb, "val_bpb_by_source": base_score.source_bpb(),
            "inference_flops_per_byte": plan["inference_flops_per_byte"],
            "train_flops_per_byte": plan["train_flops_per_byte"], "bytes_seen": base_bytes,
            "train_flops": plan["train_flops_per_byte"] * base_bytes, "steps": plan["steps"],
            "params": _n_params(base_model), "seq_len": plan["seq_len"], "model": plan["model"],
            "stage_key": base_res["key"], "dir": base_res["dir"], "score_seconds": round(time.perf_counter() - t0, 3),
            "train_val_bpb": _finite(base_sum.get("val_bpb")),
        }
        mpath = Path(base_res["dir"]) / "metrics.jsonl"
        if mpath.exists():
            curves["byte-level baseline"] = (load_curve(mpath, "byte-level baseline"), plan["train_flops_per_byte"])
        del base_model

    # ---- plot: val BPB against training FLOPs
    files: dict[str, dict] = {}
    plot = _plot_flops(curves, out / "val_bpb_vs_flops.png")
    if plot:
        files[plot.name] = {}

    # ---- patch pictures
    pics = sample_pictures(docs, threshold, ecfg.samples)
    pic_files = write_pictures(pics, out / "patches", title="BLT patches of validation documents") if pics else {}
    for p in pic_files.values():
        files[Path(p).name] = {}
    metrics["pictures"] = [{"doc": p.caption, "bytes": len(p.data), "patches": len(p.segments),
                            "bytes_per_patch": p.bytes_per_patch} for p in pics]

    # ---- generation sample (greedy, incremental)
    gen = None
    if ecfg.generate_bytes > 0:
        gen = generate(blt_model, patcher, ent_model if patcher.needs_entropies else None, ecfg.prompt,
                       ecfg.generate_bytes)
        atomic_write_bytes(out / "generation.txt", gen.prompt + gen.data)
        files["generation.txt"] = {}
        metrics["generation"] = {"prompt": ecfg.prompt, "bytes": len(gen.data), "stopped_at_eos": gen.stopped_at_eos,
                                 "bytes_per_s": round(gen.bytes_per_s, 2), "text": gen.text()}

    metrics["seconds"] = round(time.perf_counter() - started, 3)
    # ---- W&B (never fails the stage)
    metrics["wandb"] = _log_wandb(cfg, key, out, metrics, pics, plot)
    atomic_write_json(out / "metrics.json", metrics)
    files["metrics.json"] = {}
    atomic_write_text(out / "report.md", render_report(cfg, metrics, plot, pic_files, gen))
    files["report.md"] = {}
    b = metrics.get("baseline") or {}
    summary = {
        "blt_val_bpb": metrics["blt"]["val_bpb"],
        "baseline_val_bpb": b.get("val_bpb"),
        "bytes_per_patch": bpp_val,
        "val_bytes": blt_score.n,
        "flops": {
            "blt_inference_per_byte": metrics["blt"]["inference_flops_per_byte"],
            "entropy_inference_per_byte": ent_flops["total_forward"],
            "baseline_inference_per_byte": b.get("inference_flops_per_byte"),
            "blt_train": blt_train_flops,
            "baseline_train": b.get("train_flops"),
        },
        "baseline_steps": b.get("steps"),
        "generation_bytes_per_s": (metrics.get("generation") or {}).get("bytes_per_s"),
        "report": "report.md",
    }
    fields: dict[str, Any] = {"summary": summary, "files": files}
    if base_res is not None:
        fields["baseline"] = {"key": base_res["key"], "dir": base_res["dir"]}
    if metrics["wandb"]:
        fields["wandb"] = metrics["wandb"]
    return fields


def _plot_flops(curves: dict, out: Path) -> Path | None:
    from evaluation.compare import plot_curves

    usable = {name: (c, fpb) for name, (c, fpb) in curves.items() if c.val_bpb}
    if not usable:
        return None
    xs = {name: [b * fpb for b in c.bytes_seen] for name, (c, fpb) in usable.items()}
    return plot_curves([c for c, _ in usable.values()], out, x="training FLOPs", xs=xs,
                       title="validation BPB at equal training FLOPs")


# ============================================================================================ W&B
def _log_wandb(cfg: PipelineConfig, key: str, out: Path, metrics: dict, pics, plot: Path | None) -> dict | None:
    """An evaluate run (group = pipeline run, job_type = evaluate, id = evaluate-<key>); None when disabled."""
    from training.wandb_utils import resolve_mode, run_id

    try:
        mode = resolve_mode(cfg.wandb)
    except ValueError as err:
        return {"error": str(err)}
    if mode == "disabled":
        return None
    try:
        import wandb

        from blt_pipeline.stage import code_version
        from evaluation.patch_viz import pictures_html

        run = wandb.init(
            project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group or cfg.name,
            job_type=STAGE, id=run_id(STAGE, key), name=f"{cfg.name}-{STAGE}", resume="allow", dir=str(out),
            mode=mode, config={"pipeline": cfg.to_json_dict(), "stage": STAGE, "stage_key": key,
                               "code_version": code_version()},
        )
        try:
            table = wandb.Table(columns=["doc", "bytes", "patches", "bytes_per_patch", "entropy_plot", "patches_html"])
            for i, p in enumerate(pics):
                png = out / ("patches.png" if i == 0 else f"patches-{i}.png")
                table.add_data(p.caption, len(p.data), len(p.segments), p.bytes_per_patch,
                               wandb.Image(str(png)) if png.exists() else None,
                               wandb.Html(pictures_html([p], p.caption)))
            row: dict[str, Any] = {"patch_pictures": table, "eval/blt_val_bpb": metrics["blt"]["val_bpb"],
                                   "eval/bytes_per_patch": metrics["blt"]["bytes_per_patch_val"]}
            if metrics.get("baseline"):
                row["eval/baseline_val_bpb"] = metrics["baseline"]["val_bpb"]
            if plot is not None:
                row["val_bpb_vs_flops"] = wandb.Image(str(plot))
            if metrics.get("generation"):
                row["generation"] = wandb.Html("<pre>" + _html_escape(metrics["generation"]["text"]) + "</pre>")
            run.log(row)
            run.summary.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
            info = {"id": run.id, "group": cfg.wandb.group or cfg.name, "job_type": STAGE, "mode": mode,
                    "dir": getattr(run, "dir", None), "url": getattr(run, "url", None)}
        finally:
            run.finish()
        return info
    except Exception as err:  # noqa: BLE001 - W&B trouble must not lose an evaluation
        log.warning("evaluate: W&B logging failed: %s", err)
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def _html_escape(s: str) -> str:
    import html

    return html.escape(s)


# ============================================================================================ report
def _f(v, spec=".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _sci(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def render_report(cfg: PipelineConfig, m: dict, plot: Path | None, pic_files: dict, gen) -> str:
    b, base = m["blt"], m.get("baseline")
    lines = [f"# Evaluation: {cfg.name}", ""]
    lines += [f"Scored {m['val_bytes']:,} target bytes of {m['val_docs']} validation documents "
              f"(BPB = sum of cross-entropy / ln 2 / target bytes; EOS targets included).", ""]
    lines += ["| model | val BPB | params | training steps | bytes seen | training FLOPs | inference FLOPs/byte |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| BLT | {_f(b['val_bpb'])} | {b['params']:,} | {b.get('steps') or '-'} | {_sci(b['bytes_seen'])} "
                 f"| {_sci(b['train_flops'])} | {_sci(b['inference_flops_per_byte'])} "
                 f"(+{_sci(m['entropy_model']['inference_flops_per_byte'])} entropy model) |")
    if base:
        lines.append(f"| byte-level baseline | {_f(base['val_bpb'])} | {base['params']:,} | {base['steps']} "
                     f"| {_sci(base['bytes_seen'])} | {_sci(base['train_flops'])} "
                     f"| {_sci(base['inference_flops_per_byte'])} |")
    else:
        lines.append("| byte-level baseline | (disabled: eval.baseline=false) | | | | | |")
    lines.append("")
    srcs = sorted(b["val_bpb_by_source"])
    if len(srcs) > 1 or base:
        lines += ["## BPB per source", "", "| source | bytes | BLT | baseline |", "|---|---:|---:|---:|"]
        for s in srcs:
            bb = (base or {}).get("val_bpb_by_source", {}).get(s)
            lines.append(f"| {s} | {m['val_sources'].get(s, 0):,} | {_f(b['val_bpb_by_source'][s])} | {_f(bb)} |")
        lines.append("")
    lines += ["## Patching", "",
              f"- mode `{b['patch_mode']}`, threshold θ = {_f(b['threshold'], '.5g')}",
              f"- bytes per patch: {_f(b['bytes_per_patch_val'], '.3f')} on the scored docs, "
              f"{_f(b['bytes_per_patch_train'], '.3f')} over the patch stage's shards "
              "(tokens / patches, BOS/EOS included)",
              "- BLT forward FLOPs/byte by part: " + ", ".join(f"{k} {_sci(v)}" for k, v in b["flops_breakdown"].items()),
              ""]
    if plot is not None:
        lines += ["## Validation BPB against training FLOPs", "", f"![val BPB vs training FLOPs]({plot.name})", ""]
    if pic_files:
        lines += ["## Patch pictures", "",
                  "[patches.html](patches.html): text with patch boundaries, bytes shaded by entropy.", ""]
        for k, p in pic_files.items():
            if k.startswith("png"):
                lines.append(f"![patches]({Path(p).name})")
        lines.append("")
    if gen is not None:
        text = (gen.prompt + gen.data).decode("utf-8", errors="replace").replace("```", "`\u200b``")
        lines += ["## Generation (greedy, incremental decoding)", "",
                  f"{len(gen.data)} bytes at {gen.bytes_per_s:.1f} bytes/s"
                  + (" (stopped at EOS)" if gen.stopped_at_eos else "") + ":", "", "```", text, "```", ""]
    w = m.get("wandb")
    if w and w.get("id"):
        lines += [f"W&B run `{w['id']}` ({w.get('mode')}), group `{w.get('group')}`"
                  + (f": {w['url']}" if w.get("url") else f", local dir `{w.get('dir')}`"), ""]
    return "\n".join(lines) + "\n"


__all__ = ["STAGE", "VERSION", "baseline_plan", "blt_flops", "build_evaluate", "key_for", "render_report",
           "run_evaluate", "sample_pictures"]
