"""The patch stage: aligned shards, batch/chunk-invariant entropies, calibration, kill + resume, re-run no-op."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_model.config import EntropyModelConfig, TransformerShape
from blt_model.entropy_model import ByteLM
from blt_model.patching import Patcher, bytes_per_patch
from blt_model.vocab import encode_array
from blt_pipeline.config import PipelineConfig
from blt_pipeline.stage import run_stage, sha256_file
from data.ingest import run_ingest
from data.patch_stage import compute_entropies, key_for, run_patch
from data.shards import iter_docs, list_shards, read_shard
from training.artifacts import save_model

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 16


def tiny_model(seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    cfg = EntropyModelConfig(shape=TransformerShape(dim=32, n_layers=2, n_heads=2, ffn_dim=64), window=WINDOW,
                             max_seqlen=256)
    return ByteLM(cfg).eval()


def make_cfg(workdir: Path, src: Path, **patch) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "workdir": str(workdir),
        "data": {"sources": [{"kind": "files", "paths": [str(src)]}], "val_fraction": 0.3, "shard_bytes": 3000},
        "patch": {"chunk_len": 64, "batch_size": 3, "calibration_docs": 8, "target_bytes_per_patch": 3.0, **patch},
    })


def fake_entropy_stage(cfg: PipelineConfig, ingest: dict, model: ByteLM) -> dict:
    """A train_entropy stage directory holding ``model`` (built with run_stage, like the real one)."""
    return run_stage("train_entropy", cfg.workdir, {"fake": True, "cfg": model.cfg}, {"ingest": ingest["key"]}, "1",
                     lambda out: {"files": {"model.pt": {}}, "summary": {}} if save_model(
                         out, model, "entropy", model.cfg) else {})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    words = [b"def", b"return", b"x", b"self", b"import", b" ", b"\n", b"(", b")", b"caf\xc3\xa9", b"\xff\x00"]
    for i in range(14):
        n = int(rng.integers(5, 120 if i % 5 else 700))
        (src / f"f{i:02d}.txt").write_bytes(b" ".join(rng.choice(words, n)))
    (src / "one.txt").write_bytes(b"x")
    return src


@pytest.fixture(scope="module")
def stages(tmp_path_factory, corpus):
    work = tmp_path_factory.mktemp("work")
    cfg = make_cfg(work, corpus)
    ingest = run_ingest(cfg)
    entropy = fake_entropy_stage(cfg, ingest, tiny_model())
    return cfg, ingest, entropy


def patch_files(res: dict) -> dict[str, str]:
    d = Path(res["dir"])
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*.arrow"))}


# ------------------------------------------------------------------------------------------ entropies
def test_entropies_alone_batched_and_chunked_agree():
    model = tiny_model(1)
    rng = np.random.default_rng(1)
    docs = [encode_array(bytes(rng.integers(0, 256, n, dtype=np.uint8))) for n in (0, 1, 5, 40, 90, 150, 151, 300)]
    alone = [compute_entropies(model, [d], batch_size=1, chunk_len=10_000)[0] for d in docs]
    with torch.inference_mode():  # the model's own full pass, one document alone
        ref = [model.entropies(torch.from_numpy(d)[None])[0].numpy() for d in docs]
    for chunk_len, batch_size in ((10_000, 8), (64, 8), (7, 3), (WINDOW, 2), (1, 8)):
        got = compute_entropies(model, docs, batch_size=batch_size, chunk_len=chunk_len)
        for a, r, g, d in zip(alone, ref, got, docs):
            assert g.shape == (d.size,) and g.dtype == np.float32
            np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_no_leak_between_rows():
    """Changing one document of a batch leaves the others' entropies unchanged."""
    model = tiny_model(2)
    rng = np.random.default_rng(2)
    docs = [encode_array(bytes(rng.integers(0, 256, n, dtype=np.uint8))) for n in (80, 70, 75)]
    base = compute_entropies(model, docs, batch_size=3, chunk_len=32)
    docs2 = [docs[0], encode_array(b"z" * 79), docs[2]]
    other = compute_entropies(model, docs2, batch_size=3, chunk_len=32)
    np.testing.assert_allclose(base[0], other[0], atol=1e-5)
    np.testing.assert_allclose(base[2], other[2], atol=1e-5)


# ------------------------------------------------------------------------------------------ the stage
def test_shards_aligned_and_lengths_sum(stages):
    cfg, ingest, entropy = stages
    res = run_patch(cfg, ingest, entropy)
    out = Path(res["dir"])
    manifest = json.loads(Path(res["manifest"]).read_text())
    theta = res["summary"]["threshold"]
    assert theta == manifest["calibration"]["threshold"] and manifest["patcher"]["threshold"] == theta
    patcher = Patcher.from_config(cfg.patch, threshold=theta)
    n_docs = 0
    for split in ("train", "val"):
        doc_shards = list_shards(ingest["dir"], split)
        assert [p.name for p in doc_shards] == [p.name for p in list_shards(out, split)]
        for doc_path in doc_shards:
            docs, patches = read_shard(doc_path), read_shard(out / split / doc_path.name)
            assert patches.schema.field("entropies").type.value_type == "halffloat"
            assert str(patches.schema.field("patch_lengths").type) == "list<item: int32>"
            assert patches.column("doc_id").to_pylist() == docs.column("doc_id").to_pylist()
            for data, ent, pl in zip(docs.column("data").to_pylist(), patches.column("entropies").to_pylist(),
                                     patches.column("patch_lengths").to_pylist()):
                n_docs += 1
                assert len(ent) == len(data) + 2 and sum(pl) == len(data) + 2 and pl[0] == 1
                # lengths are reproducible from the stored float16 entropies
                assert patcher.patch_lengths(entropies=np.asarray(ent, np.float32)).tolist() == pl
    assert res["summary"]["docs"] == n_docs and n_docs == sum(1 for s in "train val".split()
                                                              for _ in iter_docs(ingest["dir"], s))
    stats = manifest["stats"]["all"]
    assert stats["mean_bytes_per_patch"] == pytest.approx(res["summary"]["mean_bytes_per_patch"])
    assert sum(stats["length_histogram"].values()) == stats["patches"]
    assert manifest["throughput"]["bytes_per_s"] > 0 and res["summary"]["bytes_per_s"] > 0
    assert key_for(cfg, ingest, entropy) == res["key"]
    # re-run: no-op, cached
    again = run_patch(cfg, ingest, entropy)
    assert again["cached"] and again["key"] == res["key"] and patch_files(again) == patch_files(res)


def test_entropies_in_shards_match_direct_computation(stages):
    cfg, ingest, entropy = stages
    res = run_patch(cfg, ingest, entropy)
    model = tiny_model()
    docs = [d for d in iter_docs(ingest["dir"], "train")]
    table = [read_shard(p) for p in list_shards(res["dir"], "train")]
    stored = [np.asarray(e, np.float32) for t in table for e in t.column("entropies").to_pylist()]
    direct = compute_entropies(model, [encode_array(d.data) for d in docs], batch_size=1, chunk_len=10_000)
    for s, d in zip(stored, direct):
        np.testing.assert_allclose(s, d.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_calibration_hits_target(stages):
    cfg, ingest, entropy = stages
    for target in (2.0, 3.0):
        c = cfg.model_copy(update={"patch": cfg.patch.model_copy(update={
            "target_bytes_per_patch": target, "calibration_docs": 10_000})})  # sample = every train doc
        res = run_patch(c, ingest, entropy)
        manifest = json.loads(Path(res["manifest"]).read_text())
        assert abs(manifest["calibration"]["sample_bytes_per_patch"] - target) <= 0.05 * target
        lengths = [pl for p in list_shards(res["dir"], "train")
                   for pl in read_shard(p).column("patch_lengths").to_pylist()]
        assert abs(bytes_per_patch(lengths) - target) <= 0.05 * target
        assert abs(manifest["stats"]["train"]["mean_bytes_per_patch"] - bytes_per_patch(lengths)) < 1e-4


@pytest.mark.parametrize("mode", ["space", "static", "byte"])
def test_other_modes_and_fixed_threshold(stages, mode):
    cfg, ingest, entropy = stages
    c = cfg.model_copy(update={"patch": cfg.patch.model_copy(update={"mode": mode, "static_size": 3})})
    res = run_patch(c, ingest, entropy)
    assert res["summary"]["threshold"] is None
    assert not (Path(res["dir"]) / "calibration.json").exists()
    for p in list_shards(res["dir"], "train"):
        t = read_shard(p)
        for ent, pl in zip(t.column("entropies").to_pylist(), t.column("patch_lengths").to_pylist()):
            assert sum(pl) == len(ent) and pl[0] == 1
            if mode == "byte":
                assert set(pl) == {1}
    fixed = cfg.model_copy(update={"patch": cfg.patch.model_copy(update={"threshold": 1.0})})
    assert run_patch(fixed, ingest, entropy)["summary"]["threshold"] == 1.0


def test_two_workers_same_output(stages):
    cfg, ingest, entropy = stages
    one = run_patch(cfg, ingest, entropy)
    c = cfg.model_copy(update={"workdir": cfg.workdir + "-2w",
                               "patch": cfg.patch.model_copy(update={"num_workers": 2})})
    two = run_patch(c, ingest, entropy)
    assert two["key"] != one["key"]  # num_workers is part of the config
    assert patch_files(two) == patch_files(one)


KILL_SCRIPT = r"""
import os, sys, time, json
import torch
torch.set_num_threads(1)
import data.patch_stage as ps
from blt_pipeline.config import PipelineConfig
cfg = PipelineConfig.model_validate(json.loads(sys.argv[1]))
ingest, entropy = json.loads(sys.argv[2]), json.loads(sys.argv[3])
orig = ps.write_table_atomic
calls = [0]
def slow(path, table):  # write number KILL_AT hangs mid-write, after its temp file exists
    calls[0] += 1
    if calls[0] == int(sys.argv[4]):
        from blt_pipeline.stage import atomic_path
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            print("WRITING", flush=True)
            time.sleep(60)
    return orig(path, table)
ps.write_table_atomic = slow
ps.run_patch(cfg, ingest, entropy)
"""


@pytest.mark.parametrize("phase", ["entropies", "patch lengths"])
def test_kill_mid_shard_then_resume_identical(stages, tmp_path, phase):
    """Calibrating builds write every shard's entropies (phase 1), calibrate, then the patch shards (phase 2)."""
    cfg, ingest, entropy = stages
    reference = run_patch(cfg, ingest, entropy)  # uninterrupted
    n_shards = len(json.loads(Path(reference["manifest"]).read_text())["files"]) - 1  # minus calibration.json
    assert n_shards >= 3
    kill_at = 2 if phase == "entropies" else n_shards + 2  # the 2nd shard of the phase
    c = cfg.model_copy(update={"workdir": str(tmp_path / "wd")})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, c.model_dump_json(by_alias=True), json.dumps(ingest), json.dumps(entropy),
         str(kill_at)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        line = b""
        while time.monotonic() < deadline and b"WRITING" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode())
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = Path(c.workdir) / "patch" / reference["key"][:16]
    assert not (out / "manifest.json").exists()
    assert list(out.rglob(".*.tmp"))  # the killed write left only its temp file
    finished = [p for p in out.rglob("shard-*.arrow") if "_entropies" not in p.parts]
    assert len(finished) == (0 if phase == "entropies" else 1)
    assert len(list(out.rglob("_entropies/*/shard-*.arrow"))) == (1 if phase == "entropies" else n_shards)
    resumed = run_patch(c, ingest, entropy)
    assert not resumed["cached"] and resumed["key"] == reference["key"]
    assert not list(out.rglob(".*.tmp")) and not (out / "_entropies").exists()
    assert patch_files(resumed) == patch_files(reference)
    throughput = json.loads(Path(resumed["manifest"]).read_text())["throughput"]
    assert (throughput["entropy_shards_kept"], throughput["shards_kept"]) == ((1, 0) if phase == "entropies"
                                                                               else (0, 1))
    assert run_patch(c, ingest, entropy)["cached"]


# ------------------------------------------------------------------------------------------ the flow
def test_patch_flow_runs_upstream_then_patch(prefect_harness, corpus, tmp_path, monkeypatch):
    """patch_flow with the real ingest and patch stages and a stand-in train_entropy (no training run)."""
    import importlib.machinery
    import types

    from flows import tasks as T
    from flows.patch import patch_flow

    name = "_stand_in_train_entropy"
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.run = lambda cfg, ingest: fake_entropy_stage(cfg, ingest, tiny_model())
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(T.RUNNERS, "train_entropy", (name, "run"))
    cfg = make_cfg(tmp_path / "wd", corpus)
    result = patch_flow(cfg)
    assert result["stage"] == "patch" and result["summary"]["docs"] > 0
    assert (Path(result["dir"]) / "manifest.json").exists()
    again = patch_flow(cfg)
    assert again["key"] == result["key"] and again["run"]["status"] in ("cached", "reused")
