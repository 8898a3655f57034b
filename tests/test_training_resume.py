"""Training on real text: the loss falls; N steps + failure + resume to 2N == 2N straight (ByteLM and BLT).

The runs here call the entry point (``training.run.main``) in this process to save interpreter start-ups;
the subprocess path (launcher, fail hook, W&B) is covered by ``test_training_stage.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blt_pipeline.config import load_config
from training.artifacts import load_model, save_model
from training.callbacks import FAIL_ENV, InjectedFailure
from training.run import main as run_main

# real text that ships with the project (text files only: docs/ also holds screenshots)
REPO = Path(__file__).resolve().parent.parent
DOCS = [str(REPO / "docs" / "*.md"), str(REPO / "configs" / "*.yaml"), str(REPO / "blt_model" / "*.py")]


def tiny_cfg(workdir, extra: list[str] | None = None):
    return load_config("tiny", [
        f"data.sources=[{{kind: files, paths: {json.dumps(DOCS)}}}]",
        "data.val_fraction=0.2", "data.max_doc_bytes=2048",
        "entropy.model.shape={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}",
        "entropy.model.window=64", "entropy.train.seq_len=128", "entropy.train.batch_size=4",
        "entropy.train.max_steps=16", "entropy.train.warmup_steps=2", "entropy.train.lr=0.005",
        "entropy.train.val_every_n_steps=8", "entropy.train.val_batches=2",
        "entropy.train.ckpt_every_n_steps=8", "entropy.train.log_every_n_steps=4",
        "blt.model.encoder={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}",
        "blt.model.global={dim: 64, n_layers: 1, n_heads: 2, ffn_dim: 128}",
        "blt.model.decoder={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}",
        "blt.model.hash_vocab=256", "blt.model.window=64", "blt.model.max_seqlen=512",
        "blt.train.seq_len=16", "blt.train.max_bytes_per_row=96", "blt.train.batch_size=4",
        "blt.train.max_steps=8", "blt.train.warmup_steps=2", "blt.train.val_every_n_steps=4",
        "blt.train.val_batches=2", "blt.train.ckpt_every_n_steps=4", "blt.train.log_every_n_steps=2",
        "patch.mode=static", "patch.static_size=8", "patch.chunk_len=512",
        "wandb.mode=disabled", *(extra or []),
    ], workdir=str(workdir))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A real ingest of the project's docs and a patch stage made with a random tiny entropy model."""
    from data.ingest import run_ingest
    from data.patch_stage import run_patch
    from training.artifacts import build_model

    root = tmp_path_factory.mktemp("train")
    cfg = tiny_cfg(root)
    ingest = run_ingest(cfg)
    torch.manual_seed(0)
    ent_dir = root / "fake_entropy"
    save_model(ent_dir, build_model("entropy", cfg.entropy.model), "entropy", cfg.entropy.model)
    patch = run_patch(cfg, ingest, {"key": "f" * 64, "dir": str(ent_dir)})
    return root, ingest, patch


def _train(cfg, stage: str, out, ingest, patch=None, fail_after: int | None = None, monkeypatch=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.json").write_text(json.dumps(cfg.to_json_dict()))
    argv = ["--stage", stage, "--config", str(out / "cfg.json"), "--out", str(out), "--key", "k" * 64,
            "--ingest", ingest["dir"]] + (["--patch", patch["dir"]] if patch else [])
    if fail_after is not None:
        monkeypatch.setenv(FAIL_ENV, str(fail_after))
    try:
        return run_main(argv)
    finally:
        monkeypatch.delenv(FAIL_ENV, raising=False)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a, b):
    ma, _, _ = load_model(a)
    mb, _, _ = load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


@pytest.mark.parametrize("stage", ["train_entropy", "train_blt"])
def test_resume_equals_straight_run(data, tmp_path, monkeypatch, stage):
    root, ingest, patch = data
    cfg = tiny_cfg(root)
    patch_arg = patch if stage == "train_blt" else None
    n = (cfg.entropy if stage == "train_entropy" else cfg.blt).train.max_steps // 2

    straight = tmp_path / "straight"
    assert _train(cfg, stage, straight, ingest, patch_arg, monkeypatch=monkeypatch) == 0

    resumed = tmp_path / "resumed"
    with pytest.raises(InjectedFailure):
        _train(cfg, stage, resumed, ingest, patch_arg, fail_after=n, monkeypatch=monkeypatch)
    assert (resumed / "checkpoints" / "last.ckpt").exists() and not (resumed / "model.pt").exists()
    assert _train(cfg, stage, resumed, ingest, patch_arg, monkeypatch=monkeypatch) == 0

    _assert_same_weights(straight, resumed)
    res = json.loads((resumed / "train_result.json").read_text())["summary"]
    ref = json.loads((straight / "train_result.json").read_text())["summary"]
    assert res["resumed_from_step"] == n and res["steps"] == ref["steps"] == 2 * n
    assert res["bytes_seen"] == ref["bytes_seen"]
    assert res["val_bpb"] == pytest.approx(ref["val_bpb"], rel=0, abs=0)
    # metrics.jsonl: the resumed run's rows continue the first attempt's, with no step logged twice
    steps = [(r["step"], "val/bpb" in r) for r in _rows(resumed)]
    assert steps == [(r["step"], "val/bpb" in r) for r in _rows(straight)]


def test_entropy_loss_falls_on_real_text(data, tmp_path, monkeypatch):
    root, ingest, _ = data
    cfg = tiny_cfg(root, ["entropy.train.max_steps=40", "entropy.train.val_every_n_steps=20"])
    out = tmp_path / "ent"
    assert _train(cfg, "train_entropy", out, ingest, monkeypatch=monkeypatch) == 0
    rows = _rows(out)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/bpb"] for r in rows if "val/bpb" in r]
    assert train[-1] < train[0] - 1.0, train  # ln(260)=5.56 nats at init
    assert val[-1] < val[0] and val[-1] < 6.5, val
    assert rows[-1]["bytes_seen"] == 40 * 4 * 128
    model, mcfg, kind = load_model(out)
    assert kind == "entropy" and mcfg == cfg.entropy.model


def test_blt_batches_reach_the_model_with_invariants(data, tmp_path):
    """The BLT datamodule feeds rows with the fixed patch budget and first patch 1 (checked per batch)."""
    from training.datamodule import BltDataModule

    root, ingest, patch = data
    cfg = tiny_cfg(root)
    dm = BltDataModule(mode="patches", ingest_dir=ingest["dir"], patch_dir=patch["dir"], train_cfg=cfg.blt.train)
    batch = next(iter(dm.train_dataloader()))
    assert batch["patch_lengths"].shape == (4, 16) and (batch["patch_lengths"][:, 0] == 1).all()
    assert (batch["patch_lengths"].sum(1) == batch["x"].shape[1] + 1).all() and batch["x"].shape[1] <= 96
    # static patches of 8 bytes: 16 patches would need ~128 bytes, so rows stop at the 96-byte cap and end
    # in zero-length patches, which the model must accept
    assert (batch["patch_lengths"] == 0).any() and batch["mask"].sum(1).max() == 96


def test_baseline_entry_point(data, tmp_path, monkeypatch):
    """train_baseline: a ByteLM of eval.baseline_model shape, full attention over rows of the BLT's byte cap."""
    from blt_model.flops import bytelm_flops_per_byte
    from training.run import baseline_setup

    root, ingest, _ = data
    cfg = tiny_cfg(root, ["eval.baseline_model={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}"])
    out = tmp_path / "base"
    out.mkdir()
    (out / "cfg.json").write_text(json.dumps(cfg.to_json_dict()))
    argv = ["--stage", "train_baseline", "--config", str(out / "cfg.json"), "--out", str(out), "--key", "b" * 64,
            "--ingest", ingest["dir"], "--max-steps", "3"]
    assert run_main(argv) == 0
    model, mcfg, kind = load_model(out)
    expected, train = baseline_setup(cfg, max_steps=3)
    assert kind == "baseline" and mcfg == expected and mcfg.window == mcfg.max_seqlen == 96
    assert train.seq_len == 96 and train.max_steps == 3 and train.batch_size == cfg.blt.train.batch_size
    summary = json.loads((out / "train_result.json").read_text())["summary"]
    assert summary["steps"] == 3 and summary["bytes_seen"] == 3 * 4 * 96
    assert bytelm_flops_per_byte(mcfg, 96)["total_train"] > 0
