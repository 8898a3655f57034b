"""The evaluate stage on tiny stand-in models: report, metrics, plot, pictures, baseline at equal FLOPs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_model.config import BltConfig, EntropyModelConfig, TransformerShape
from blt_model.entropy_model import ByteLM
from blt_model.model import BLT
from blt_pipeline.config import PipelineConfig
from blt_pipeline.stage import read_manifest, run_stage
from data.ingest import run_ingest
from data.patch_stage import run_patch
from evaluation import bpb as B
from training.artifacts import save_model

SMALL = TransformerShape(dim=32, n_layers=1, n_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    words = [b"def", b"return", b"x", b"self", b"import", b" ", b"\n", b"(", b")", b"caf\xc3\xa9", b"\xff"]
    for sub in ("code", "text"):
        (root / sub).mkdir()
        for i in range(12):
            n = int(rng.integers(20, 200))
            (root / sub / f"f{i:02d}.txt").write_bytes(b" ".join(rng.choice(words, n)))
    return root


def make_cfg(work: Path, src: Path, **eval_) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "evaltest", "workdir": str(work),
        "data": {"sources": [{"kind": "files", "paths": [str(src / "code")]},
                             {"kind": "files", "paths": [str(src / "text")]}],
                 "val_fraction": 0.4, "shard_bytes": 4000},
        "entropy": {"model": {"shape": SMALL.model_dump(), "window": 32, "max_seqlen": 256}},
        "patch": {"chunk_len": 128, "batch_size": 4, "calibration_docs": 8, "target_bytes_per_patch": 3.0},
        "blt": {"model": {"encoder": SMALL.model_dump(), "global": {"dim": 64, "n_layers": 1, "n_heads": 2},
                          "decoder": SMALL.model_dump(), "hash_sizes": [3, 4], "hash_vocab": 64, "window": 32,
                          "max_seqlen": 512},
                "train": {"seq_len": 16, "max_bytes_per_row": 64, "batch_size": 4, "max_steps": 10}},
        "eval": {"baseline_model": {"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64}, "max_val_bytes": 3000,
                 "samples": 2, "generate_bytes": 16, **eval_},
        "wandb": {"mode": "disabled"},
    })


def _fake_training_stage(stage, cfg, inputs, kind, model, bytes_per_step, steps=10):
    def build(out: Path):
        save_model(out, model, kind, model.cfg)
        rows = []
        for s in range(1, steps + 1):
            rows.append({"step": s, "bytes_seen": s * bytes_per_step, "train/bytes_seen": s * bytes_per_step,
                         "train/loss": 5.0 - 0.1 * s})
            if s % 5 == 0:
                rows.append({"step": s, "bytes_seen": s * bytes_per_step, "val/bpb": 7.5 - 0.1 * s})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"files": {"model.pt": {}, "metrics.jsonl": {}},
                "summary": {"val_bpb": 7.0, "steps": steps, "bytes_seen": steps * bytes_per_step}}
    return run_stage(stage, cfg.workdir, {"fake": stage, "steps": steps}, inputs, "1", build)


def _quick_fit(model, docs, kind, steps=15):
    """A few Adam steps on whole documents so BPB falls below 8 (random init sits at log2(260) = 8.02)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for i in range(steps):
        d = docs[i % len(docs)]
        t = torch.from_numpy(d.tokens[None, :65])
        if kind == "blt":
            pl = torch.from_numpy(B.truncate_lengths(d.patch_lengths, t.shape[1])[None])
            logits = model(t[:, :-1], pl)
        else:
            logits = model(t[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], t[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, corpus):
    work = tmp_path_factory.mktemp("work")
    cfg = make_cfg(work, corpus)
    torch.manual_seed(0)
    ingest = run_ingest(cfg)
    ent = ByteLM(cfg.entropy.model).eval()
    entropy = _fake_training_stage("train_entropy", cfg, {"ingest": ingest["key"]}, "entropy", ent, 512)
    patch = run_patch(cfg, ingest, entropy)
    docs = list(B.iter_val_docs(ingest["dir"], patch["dir"], split="train"))
    model = _quick_fit(BLT(cfg.blt.model), docs, "blt")
    blt = _fake_training_stage("train_blt", cfg, {"ingest": ingest["key"], "patch": patch["key"]}, "blt",
                               model, 4 * 50)
    return work, ingest, entropy, patch, blt


@pytest.fixture
def fake_baseline(monkeypatch):
    calls = []

    def run_train_baseline(cfg, ingest, max_steps, *, seq_len=None):
        from training.run import baseline_setup

        model_cfg, train = baseline_setup(cfg, seq_len, max_steps)
        calls.append(max_steps)
        torch.manual_seed(1)
        docs = list(B.iter_val_docs(ingest["dir"], split="train"))
        model = _quick_fit(ByteLM(model_cfg), docs, "baseline")
        return _fake_training_stage("train_baseline", cfg, {"ingest": ingest["key"]}, "baseline",
                                    model, train.batch_size * train.seq_len, max_steps)

    from training import blt_stage

    monkeypatch.setattr(blt_stage, "run_train_baseline", run_train_baseline)
    return calls


def test_evaluate_writes_report_metrics_plot(upstream, corpus, fake_baseline):
    from evaluation.evaluate import baseline_plan, run_evaluate

    work, ingest, entropy, patch, blt = upstream
    cfg = make_cfg(work, corpus)
    res = run_evaluate(cfg, ingest, entropy, patch, blt)
    d = Path(res["dir"])
    assert res["report"] == str(d / "report.md") and read_manifest(d) is not None
    m = json.loads((d / "metrics.json").read_text())
    for who in ("blt", "baseline"):
        assert 0 < m[who]["val_bpb"] < 8 and math.isfinite(m[who]["val_bpb"])
        assert set(m[who]["val_bpb_by_source"]) == set(m["val_sources"]) and len(m["val_sources"]) == 2
    assert 0 < m["val_bytes"] <= 3000
    # FLOP matching: the baseline's training FLOPs are within one step of the BLT's
    plan = baseline_plan(cfg, m["blt"]["train_flops"])
    assert fake_baseline == [plan["steps"]]
    one_step = plan["train_flops_per_byte"] * plan["bytes_per_step"]
    assert abs(m["baseline"]["train_flops"] - m["blt"]["train_flops"]) <= one_step
    assert m["blt"]["inference_flops_per_byte"] > 0 and m["blt"]["bytes_per_patch_val"] > 1
    s = res["summary"]
    assert s["blt_val_bpb"] == m["blt"]["val_bpb"] and s["baseline_val_bpb"] == m["baseline"]["val_bpb"]
    assert s["bytes_per_patch"] > 1 and s["flops"]["blt_train"] > 0
    assert (d / "val_bpb_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    assert (d / "patches.png").exists() and (d / "patches-1.png").exists()
    report = (d / "report.md").read_text()
    assert "byte-level baseline" in report and "val_bpb_vs_flops.png" in report and "patches.html" in report
    from evaluation.patch_viz import parse_html_segments

    segs = parse_html_segments((d / "patches.html").read_text())
    assert len(segs) == 2 and all(len(s) > 1 for s in segs)
    assert (d / "generation.txt").read_bytes().startswith(cfg.eval.prompt.encode())
    # cached: a second call reuses the directory
    again = run_evaluate(cfg, ingest, entropy, patch, blt)
    assert again["cached"] and again["key"] == res["key"]


def test_evaluate_without_baseline_logs_wandb_offline(upstream, corpus, fake_baseline):
    from evaluation.evaluate import run_evaluate

    work, ingest, entropy, patch, blt = upstream
    cfg = make_cfg(work, corpus, baseline=False, samples=1, generate_bytes=0)
    cfg = cfg.model_copy(update={"wandb": cfg.wandb.model_copy(update={"mode": "offline"})})
    res = run_evaluate(cfg, ingest, entropy, patch, blt)
    m = json.loads((Path(res["dir"]) / "metrics.json").read_text())
    assert fake_baseline == [] and "baseline" not in m and res["summary"]["baseline_val_bpb"] is None
    assert m["wandb"] and m["wandb"].get("job_type") == "evaluate", m["wandb"]
    assert list((Path(res["dir"]) / "wandb").glob("offline-run-*"))
    assert "disabled" in (Path(res["dir"]) / "report.md").read_text()


def test_patch_rows_follow_packer_rules():
    tokens = np.arange(1, 40)
    lengths = np.array([1, 5, 3, 10, 2, 7, 11])
    assert lengths.sum() == tokens.size
    rows = B.patch_rows(tokens, lengths, seq_len=3, max_bytes=8)
    covered = set()
    for t, pl in rows:
        assert pl[0] == 1 and pl.sum() == t.size and pl.size <= 3 and t.size <= 9
        covered.update(t[1:].tolist())  # targets
    assert covered == set(tokens[1:].tolist())
    assert sum(t.size - 1 for t, _ in rows) == tokens.size - 1  # every target exactly once
    assert B.truncate_lengths(lengths, 8).tolist() == [1, 5, 2]


def test_blt_score_equals_direct_forward():
    torch.manual_seed(0)
    cfg = BltConfig(encoder=SMALL, global_=TransformerShape(dim=64, n_layers=1, n_heads=2), decoder=SMALL,
                    hash_sizes=[3], hash_vocab=31, window=16, max_seqlen=256)
    m = BLT(cfg).eval()
    data = b"hello world, hello bytes"
    tok = np.concatenate(([1], np.frombuffer(data, np.uint8) + 4, [2])).astype(np.int64)
    lengths = np.array([1, 6, 6, 7, 4, 1])
    doc = B.ValDoc("d", "s", data, tok, lengths)
    s = B.score_blt(m, [doc], seq_len=64, max_bytes=256)
    with torch.no_grad():
        logits = m(torch.from_numpy(tok[None, :-1]), torch.from_numpy(lengths[None]))
        ce = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(tok[1:]), reduction="sum")
    assert s.n == tok.size - 1 and abs(s.ce - float(ce)) < 1e-3
    em = ByteLM(EntropyModelConfig(shape=SMALL, window=8, max_seqlen=64)).eval()
    a = B.score_bytelm(em, [doc], seq_len=7)  # several overlapping rows, window < row
    b = B.score_bytelm(em, [doc], seq_len=64)
    assert a.n == b.n == tok.size - 1 and a.ce > 0 and b.ce > 0


def test_cli_generate_and_show_patches_from_blt_dir(upstream, tmp_path, capsys):
    from blt_pipeline.cli import main

    work, ingest, entropy, patch, blt = upstream
    assert main(["generate", "--checkpoint", blt["dir"], "--prompt", "def ", "--max-bytes", "12"]) == 0
    cached = capsys.readouterr()
    assert cached.out.startswith("def ") and "bytes/s" in cached.err
    assert main(["generate", "--checkpoint", str(Path(blt["dir"]) / "model.pt"), "--prompt", "def ",
                 "--max-bytes", "12", "--no-cache"]) == 0
    assert capsys.readouterr().out == cached.out  # greedy: same bytes either way
    assert main(["generate", "--checkpoint", blt["dir"], "--prompt", "x", "--max-bytes", "8",
                 "--temperature", "0.9", "--top-p", "0.8", "--seed", "1"]) == 0
    capsys.readouterr()
    text = "def f(x):\n    return x\n"
    out = tmp_path / "pp"
    assert main(["show-patches", "--checkpoint", blt["dir"], "--text", text, "--out", str(out)]) == 0
    from evaluation.patch_viz import parse_html_segments

    segs = parse_html_segments((tmp_path / "pp.html").read_text())[0]
    assert b"".join(segs) == text.encode() and (tmp_path / "pp.png").exists()
    # an entropy checkpoint: θ from the patch stage that used it, or --threshold
    assert main(["show-patches", "--checkpoint", entropy["dir"], "--text", "ab", "--out", str(out)]) == 0
    assert main(["show-patches", "--checkpoint", entropy["dir"], "--text", text, "--threshold", "5.0",
                 "--out", str(out)]) == 0
