"""Training-step throughput of our BLT next to transformers' BltForCausalLM, same process, interleaved.

    python -m bench.bench_model [--steps 7] [--warmup 2] [--threads 2] [--no-profile] [--out PATH]

Shape: ``shared/bench/blt_cpu_reference.json`` (random init, seed 0, fp32, batch 4 x 1024 random byte ids in
[4, 260), fixed patch lengths [1, 4, 5, 4, 5, ...] truncated to sum 1024 = 229 patches per row). Our model is
``blt_model.convert.from_hf`` of the HF model, so both compute the same function (the max logit difference is
reported). A step = forward + cross-entropy + backward + fused AdamW (lr 1e-4) step (the same optimizer for both). Steps alternate ours/HF, and
the medians of ``--steps`` steps after ``--warmup`` are reported. MFU = analytic training FLOPs/byte
(``blt_model.flops``, 3x forward model FLOPs) x bytes/s / measured fp32 matmul peak (2048^3, same threads).
The machine is shared with other jobs: numbers are noisy; interleaving keeps the ratio fair.
Results go to ``bench/results/model.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import reference_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "model.md"


def fixed_lengths(seqlen: int) -> list[int]:
    out, i = [1], 0
    while sum(out) < seqlen:
        out.append(min((4, 5)[i % 2], seqlen - sum(out)))
        i += 1
    return out


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / min(ts)


def make_models(ref: dict):
    from transformers import BltConfig as HFConfig
    from transformers import BltForCausalLM

    from blt_model.convert import from_hf

    torch.manual_seed(ref["seed"])
    cfg = HFConfig(**ref["transformers_BltConfig_kwargs"])
    cfg._attn_implementation = "sdpa"
    hf = BltForCausalLM(cfg)
    ours, _ = from_hf(hf)
    hf.train()
    ours.train()
    return ours, hf


def step_fns(ours, hf, ids, lengths):
    y = torch.roll(ids, -1, dims=1)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4, fused=True)
    opt_h = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def ours_step():
        logits = ours(ids, lengths)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def hf_step():
        logits = hf(input_ids=ids, patch_lengths=lengths, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt_h.step()
        opt_h.zero_grad(set_to_none=True)

    return ours_step, hf_step


def baseline_step_fn(ref: dict, ids: torch.Tensor):
    """Our byte-level baseline (``ByteLM``, full causal window) at the reference Llama shape."""
    from blt_model.config import EntropyModelConfig, TransformerShape
    from blt_model.entropy_model import ByteLM

    kw = ref["transformers_LlamaConfig_kwargs"]
    cfg = EntropyModelConfig(
        shape=TransformerShape(dim=kw["hidden_size"], n_layers=kw["num_hidden_layers"],
                               n_heads=kw["num_attention_heads"], n_kv_heads=kw["num_key_value_heads"],
                               ffn_dim=kw["intermediate_size"]),
        window=ids.shape[1], rope_theta=kw["rope_parameters"]["rope_theta"], max_seqlen=ids.shape[1])
    torch.manual_seed(ref["seed"])
    model = ByteLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    y = torch.roll(ids, -1, dims=1)

    def step():
        logits = model(ids)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, cfg


def profile_top(fn, n: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from blt_model.config import BltConfig
    from blt_model.flops import blt_flops_per_byte, bytelm_flops_per_byte

    ref = reference_json()
    B, L = ref["batch"], ref["seqlen"]
    lens = fixed_lengths(L)
    assert len(lens) == ref["fixed_patch_lengths"]["n_patches"], len(lens)
    ours, hf = make_models(ref)
    g = torch.Generator().manual_seed(ref["seed"])
    ids = torch.randint(4, 260, (B, L), generator=g)
    lengths = torch.tensor([lens] * B)
    with torch.no_grad():
        diff = (ours(ids, lengths) - hf(input_ids=ids, patch_lengths=lengths, use_cache=False).logits).abs().max()
    flops = blt_flops_per_byte(BltConfig.reference_tiny(), L / len(lens), L)
    ours_step, hf_step = step_fns(ours, hf, ids, lengths)
    base_step, base_cfg = baseline_step_fn(ref, ids)
    base_flops = bytelm_flops_per_byte(base_cfg, L)

    peaks = [matmul_peak()]
    t_o, t_h, t_b = [], [], []
    order = [(ours_step, t_o), (hf_step, t_h), (base_step, t_b)]
    for i in range(args.warmup + args.steps):
        for fn, acc in order[i % 3:] + order[: i % 3]:  # rotate the order every step
            t = time.perf_counter()
            fn()
            if i >= args.warmup:
                acc.append(time.perf_counter() - t)
    peaks.append(matmul_peak())
    peak = max(peaks)
    med_o, med_h, med_b = statistics.median(t_o), statistics.median(t_h), statistics.median(t_b)
    bps_o, bps_h, bps_b = B * L / med_o, B * L / med_h, B * L / med_b
    res = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "max_abs_logit_diff": float(diff),
        "matmul_peak_gflops": peak / 1e9,
        "ours_step_s": t_o,
        "hf_step_s": t_h,
        "ours_bytes_per_s": bps_o,
        "hf_bytes_per_s": bps_h,
        "speedup": bps_o / bps_h,
        "train_flops_per_byte": flops["total_train"],
        "ours_mfu": flops["total_train"] * bps_o / peak,
        "hf_mfu": flops["total_train"] * bps_h / peak,
        "baseline_step_s": t_b,
        "baseline_bytes_per_s": bps_b,
        "baseline_train_flops_per_byte": base_flops["total_train"],
        "baseline_mfu": base_flops["total_train"] * bps_b / peak,
        "blt_over_baseline": bps_o / bps_b,
    }
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if not args.no_profile:
        res["profile_ours"] = profile_top(ours_step)
        res["profile_hf"] = profile_top(hf_step)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("profile")}, indent=1))
    if not args.no_profile:
        print("ours:\n" + res["profile_ours"])
        print("transformers:\n" + res["profile_hf"])
    write_md(res, flops, args.out)
    return res


def write_md(res: dict, flops: dict, out: Path) -> None:
    lines = [
        "# BLT training-step throughput: ours vs transformers BltForCausalLM vs a byte-level baseline",
        "",
        "`python -m bench.bench_model` (see its docstring for the setup). Reference shape of",
        "`shared/bench/blt_cpu_reference.json`, batch 4 x 1024 bytes, fixed patches [1,4,5,4,5,...] (229/row), fp32,",
        "forward + CE + backward + AdamW, steps interleaved in one process. **The machine is shared with other",
        "jobs, so absolute numbers are noisy**; the ratio is the meaningful number.",
        "",
        f"- date: {res['date']}; machine: {res['machine']}; torch {res['torch']}, transformers "
        f"{res.get('transformers', '?')}; {res['threads']} threads",
        f"- fp32 matmul peak (2048^3, best of runs): {res['matmul_peak_gflops']:.1f} GFLOP/s",
        f"- medians of {res['steps']} steps after {res['warmup']} warm-up; parity max |logit diff| "
        f"{res['max_abs_logit_diff']:.2e}",
        "",
        "| model | median step (s) | train bytes/s | MFU (model FLOPs) |",
        "|---|---|---|---|",
        f"| ours `blt_model.BLT` | {statistics.median(res['ours_step_s']):.3f} | {res['ours_bytes_per_s']:.0f} | "
        f"{res['ours_mfu']:.2f} |",
        f"| transformers `BltForCausalLM` | {statistics.median(res['hf_step_s']):.3f} | {res['hf_bytes_per_s']:.0f} | "
        f"{res['hf_mfu']:.2f} |",
        f"| byte-level baseline (our `ByteLM`, reference Llama shape, full causal) | "
        f"{statistics.median(res['baseline_step_s']):.3f} | {res['baseline_bytes_per_s']:.0f} | "
        f"{res['baseline_mfu']:.2f} |",
        "",
        f"**Speed-up: {res['speedup']:.2f}x** over transformers (goal 1.5x); BLT / byte-level baseline "
        f"bytes/s: {res['blt_over_baseline']:.2f} (baseline train FLOPs/byte "
        f"{res['baseline_train_flops_per_byte'] / 1e6:.1f}M vs BLT {res['train_flops_per_byte'] / 1e6:.1f}M).",
        "",
        "Per-step times (s): ours " + ", ".join(f"{t:.3f}" for t in res["ours_step_s"]) + "; transformers "
        + ", ".join(f"{t:.3f}" for t in res["hf_step_s"]) + ".",
        "",
        f"Model FLOPs per byte (forward, `blt_model.flops`, 229 patches / 1024 bytes): total "
        f"{flops['total_forward'] / 1e6:.2f}M (train {flops['total_train'] / 1e6:.2f}M): encoder "
        f"{flops['encoder'] / 1e6:.2f}M, global {flops['global'] / 1e6:.2f}M, decoder {flops['decoder'] / 1e6:.2f}M, "
        f"cross-attention {flops['cross_attention'] / 1e6:.2f}M, head {flops['head'] / 1e6:.2f}M; attention "
        f"terms {flops['attention'] / 1e6:.2f}M of it.",
        "",
    ]
    if "profile_ours" in res:
        lines += ["## Profiles (one training step, top ops by self CPU time)", "", "ours:", "```",
                  res["profile_ours"].rstrip(), "```", "", "transformers:", "```", res["profile_hf"].rstrip(), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
