"""Generation speed: incremental BLT decoding vs full recompute vs transformers' BltForCausalLM (no cache).

    python -m bench.bench_generate [--new-bytes 256] [--reps 3] [--slow-reps 1] [--threads 2] [--quick]

Shape: ``shared/bench/blt_cpu_reference.json`` (random init, seed 0, fp32, patcher threshold 5.1524 so the
random patcher makes multi-byte patches). Our BLT and entropy model are ``blt_model.convert.from_hf`` of the
HF model, so all three decode the same function. Greedy, batch 1, a fixed 48-byte prompt, exactly
``--new-bytes`` new bytes (EOS suppressed; HF with ``min_new_tokens``):

* **cached**: ``blt_model.generation.generate(use_cache=True)``: entropy model, local encoder and local
  decoder take one byte per step against rolling KV caches; the global transformer runs once per patch;
* **full recompute**: ``use_cache=False``: entropy model, patcher and BLT over the whole prefix per byte (the
  reference ``generate_nocache``);
* **HF**: ``BltForCausalLM.generate(use_cache=False)`` (its cached path is unreliable, PLATFORM_NOTES).

bytes/s = new bytes / wall seconds of the whole call (prompt prefill included). Medians over ``--reps`` runs
(cached) and ``--slow-reps`` (the two slow ones), interleaved. The outputs are compared byte for byte.
Results go to ``bench/results/generate.md`` (and ``generate.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time
from pathlib import Path

from bench.common import machine_line, reference_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "generate.md"
PROMPT = b"def fibonacci(n):\n    a, b = 0, 1\n    for _ in r"  # 48 bytes


def build(ref: dict):
    import torch
    from transformers import BltConfig, BltForCausalLM

    from blt_model.convert import from_hf
    from blt_model.patching import Patcher

    torch.manual_seed(ref.get("seed", 0))
    cfg = BltConfig(**ref["transformers_BltConfig_kwargs"])
    cfg._attn_implementation = "sdpa"
    hf = BltForCausalLM(cfg).eval()
    blt, ent = from_hf(hf)
    patcher = Patcher(mode="entropy", threshold=float(cfg.patching_threshold), max_patch_length=cfg.max_patch_length)
    return hf, blt, ent, patcher


def run_hf(hf, prompt: bytes, n: int) -> tuple[bytes, float]:
    import torch

    ids = torch.tensor([[1] + [b + 4 for b in prompt]])
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=False,
                          pad_token_id=0)
    secs = time.perf_counter() - t
    toks = out[0, ids.shape[1]:].tolist()
    return bytes(t - 4 for t in toks if t >= 4), secs


def common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-bytes", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="runs of the cached decoder (median)")
    ap.add_argument("--slow-reps", type=int, default=1, help="runs of full recompute and HF (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="32 new bytes, one run each")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.new_bytes, args.reps, args.slow_reps = 32, 1, 1
    import warnings

    import torch

    from blt_model.generation import generate

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    ref = reference_json()
    hf, blt, ent, patcher = build(ref)
    n = args.new_bytes
    generate(blt, patcher, ent, PROMPT, 8, stop_at_eos=False)  # warm-up (allocator, RoPE tables)
    cached, full, hfs = [], [], []
    cpu: dict[str, list[float]] = {"cached": [], "full": [], "hf": []}
    outs: dict[str, bytes] = {}
    prof = None
    for r in range(max(args.reps, args.slow_reps)):
        if r < args.reps:
            c0 = time.process_time()
            g = generate(blt, patcher, ent, PROMPT, n, stop_at_eos=False, profile=True)
            cpu["cached"].append(time.process_time() - c0)
            cached.append(g.seconds)
            outs["cached"] = g.data
            prof, patches = g.profile, g.patch_lengths  # type: ignore[attr-defined]
        if r < args.slow_reps:
            c0 = time.process_time()
            g2 = generate(blt, patcher, ent, PROMPT, n, stop_at_eos=False, use_cache=False)
            cpu["full"].append(time.process_time() - c0)
            full.append(g2.seconds)
            outs["full"] = g2.data
            if not args.no_hf:
                c0 = time.process_time()
                data, secs = run_hf(hf, PROMPT, n)
                cpu["hf"].append(time.process_time() - c0)
                hfs.append(secs)
                outs["hf"] = data
    med = {k: statistics.median(v) for k, v in (("cached", cached), ("full", full), ("hf", hfs)) if v}
    bps = {k: n / v for k, v in med.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items() if v}
    res = {
        "machine": machine_line(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": os.getloadavg(), "threads": args.threads, "new_bytes": n, "prompt_bytes": len(PROMPT),
        "reps": {"cached": len(cached), "full": len(full), "hf": len(hfs)},
        "seconds": med, "bytes_per_s": bps, "cpu_seconds": cpu_med,
        "speedup_vs_full_cpu": cpu_med["full"] / cpu_med["cached"],
        "speedup_vs_full": bps["cached"] / bps["full"],
        "speedup_vs_hf": (bps["cached"] / bps["hf"]) if "hf" in bps else None,
        "cached_equals_full": outs["cached"] == outs.get("full"),
        "hf_common_prefix": common_prefix(outs["cached"], outs["hf"]) if "hf" in outs else None,
        "patches_generated": len(patches) - 1,
        "mean_patch_len": (len(PROMPT) + 1 + n + 1) / len(patches),
        "profile_s": {k: round(v, 3) for k, v in prof.seconds.items()},
        "medians": {"cached_bytes_per_s": round(bps["cached"], 2), "full_recompute_bytes_per_s": round(bps["full"], 2),
                    **({"hf_no_cache_bytes_per_s": round(bps["hf"], 2)} if "hf" in bps else {}),
                    "speedup_vs_full": round(bps["cached"] / bps["full"], 2),
                    "speedup_vs_full_cpu_time": round(cpu_med["full"] / cpu_med["cached"], 2)},
    }
    print(json.dumps(res, indent=1, default=str))
    write_results(args.out, res)
    return res


def write_results(path: Path, r: dict) -> None:
    from blt_pipeline.stage import atomic_write_json, atomic_write_text

    b, c = r["bytes_per_s"], r["cpu_seconds"]
    lines = [
        "# Generation benchmark (`python -m bench.bench_generate`)", "",
        f"- machine: {r['machine']}",
        f"- date: {r['date']}",
        f"- load average at the end: {', '.join(f'{x:.1f}' for x in r['load'])} (shared machine: absolute "
        "numbers are noisy; all three run interleaved in one process)",
        f"- torch threads: {r['threads']}; shape `shared/bench/blt_cpu_reference.json` (random init, seed 0, fp32), "
        f"patcher threshold from the same file; greedy, batch 1, {r['prompt_bytes']}-byte prompt, "
        f"{r['new_bytes']} new bytes (EOS suppressed)",
        f"- bytes/s = new bytes / wall time of the whole call (prefill included); medians of "
        f"{r['reps']['cached']} (cached) / {r['reps']['full']} (full) / {r['reps']['hf']} (HF) runs; CPU s = "
        "process CPU time of the call (with 1 thread: the time on an otherwise idle core, robust to load)",
        "",
        "| decoder | wall s | bytes/s | speedup of cached | CPU s | speedup by CPU time |",
        "|---|---:|---:|---:|---:|---:|",
        f"| ours, incremental (`generate(use_cache=True)`) | {r['seconds']['cached']:.2f} | {b['cached']:.1f} | 1.0x "
        f"| {c['cached']:.2f} | 1.0x |",
        f"| ours, full recompute per byte (`use_cache=False`) | {r['seconds']['full']:.2f} | {b['full']:.2f} "
        f"| {b['cached'] / b['full']:.1f}x | {c['full']:.2f} | {c['full'] / c['cached']:.1f}x |",
    ]
    if "hf" in b:
        lines.append(f"| transformers `BltForCausalLM.generate(use_cache=False)` | {r['seconds']['hf']:.2f} "
                     f"| {b['hf']:.2f} | {b['cached'] / b['hf']:.1f}x | {c['hf']:.2f} | {c['hf'] / c['cached']:.1f}x |")
    lines += [
        "",
        f"- cached output equals full recompute byte for byte: **{r['cached_equals_full']}**",
    ]
    if r.get("hf_common_prefix") is not None:
        lines.append(f"- HF output agrees with ours on the first {r['hf_common_prefix']} of {r['new_bytes']} bytes "
                     "(same weights; HF has no document masks and pads patches differently, so later bytes may "
                     "diverge on near-ties)")
    lines += [
        f"- {r['patches_generated']} patches over prompt + generation, mean {r['mean_patch_len']:.2f} positions "
        "per patch (the global transformer runs once per patch)",
        "- cached time by part (s, one run): " + ", ".join(f"{k} {v}" for k, v in r["profile_s"].items()),
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(path.with_suffix(".json"), r)


if __name__ == "__main__":
    main()
