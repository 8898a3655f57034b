"""Training stages through the real launcher: subprocess, fail hook + resume, W&B offline run, DDP in a flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blt_pipeline.config import load_config
from training.callbacks import FAIL_ENV
from training.launch import TrainingFailed
from training.wandb_utils import X_AXIS, offline_runs, read_offline_run

# real text that ships with the project (text files only: docs/ also holds screenshots)
REPO = Path(__file__).resolve().parent.parent
DOCS = [str(REPO / "docs" / "*.md"), str(REPO / "configs" / "*.yaml"), str(REPO / "blt_model" / "*.py")]


def cfg_for(workdir, extra: list[str] | None = None):
    return load_config("tiny", [
        "name=trtest",
        f"data.sources=[{{kind: files, paths: {json.dumps(DOCS)}}}]",
        "data.val_fraction=0.2", "data.max_doc_bytes=2048",
        "entropy.model.shape={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}",
        "entropy.model.window=64", "entropy.train.seq_len=64", "entropy.train.batch_size=2",
        "entropy.train.max_steps=8", "entropy.train.warmup_steps=1",
        "entropy.train.val_every_n_steps=4", "entropy.train.val_batches=1",
        "entropy.train.ckpt_every_n_steps=4", "entropy.train.log_every_n_steps=2",
        "wandb.group=grp-test", *(extra or [])], workdir=str(workdir))


@pytest.fixture(scope="module")
def ingest_result(tmp_path_factory):
    from data.ingest import run_ingest

    root = tmp_path_factory.mktemp("stage")
    return root, run_ingest(cfg_for(root))


def test_fail_resume_and_wandb_offline_run(ingest_result, monkeypatch):
    from training.entropy_stage import key_for, run_train_entropy

    root, ingest = ingest_result
    cfg = cfg_for(root, ["wandb.mode=offline"])
    monkeypatch.setenv(FAIL_ENV, "4")
    with pytest.raises(TrainingFailed, match="BLT_FAIL_AFTER_STEPS"):
        run_train_entropy(cfg, ingest)
    monkeypatch.delenv(FAIL_ENV)
    result = run_train_entropy(cfg, ingest)
    out = Path(result["dir"])
    assert result["key"] == key_for(cfg, ingest) and not result["cached"]
    s = result["summary"]
    assert s["resumed_from_step"] == 4 and s["steps"] == 8 and s["bytes_seen"] == 8 * 2 * 64
    assert s["val_bpb"] > 0 and s["train_loss"] > 0 and s["bytes_per_s"] > 0 and s["seconds"] > 0
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert set(manifest["files"]) == {"model.pt", "metrics.jsonl"} and manifest["inputs"] == {"ingest": ingest["key"]}
    assert "resuming from" in (out / "train.log").read_text()
    assert run_train_entropy(cfg, ingest)["cached"] is True

    # W&B: both attempts wrote offline runs with the same stable id, group and job type
    runs = offline_runs(out)
    assert len(runs) == 2 and all(r.name.endswith(f"train_entropy-{result['key'][:16]}") for r in runs)
    rec = read_offline_run(runs[-1])
    assert rec["run"]["run_group"] == "grp-test" and rec["run"]["job_type"] == "train_entropy"
    assert rec["run"]["run_id"] == f"train_entropy-{result['key'][:16]}"
    assert rec["config"]["stage_key"] == result["key"]
    assert rec["config"]["pipeline"]["entropy"]["train"]["max_steps"] == 8
    assert "code_version" in rec["config"]
    for name in ("train/loss", "train/bpb", "val/bpb", "perf/bytes_per_s", "perf/mfu"):
        assert rec["metrics"].get(name) == X_AXIS, name
    logged = set().union(*rec["history"])
    assert {"train/loss", "train/bpb", "val/bpb", "perf/bytes_per_s", "perf/mfu", X_AXIS} <= logged
    assert all(X_AXIS in row for row in rec["history"])
    # the local metrics file has every step once, across both attempts
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [2, 4, 6, 8]


def test_ddp_two_cpu_ranks_inside_a_prefect_flow(ingest_result, prefect_harness, tmp_path):
    from prefect import flow

    from flows.train_entropy import train_entropy_flow

    root, _ = ingest_result
    cfg = cfg_for(root, ["entropy.train.devices=2", "entropy.train.strategy=ddp", "wandb.mode=disabled"])
    counter = tmp_path / "flow_runs.txt"

    @flow(name="ddp-counter")
    def counted(config):
        with open(counter, "a") as f:
            f.write("body\n")
        return train_entropy_flow(config)

    result = counted(cfg)
    assert counter.read_text().splitlines() == ["body"], "the flow body ran more than once"
    out = Path(result["dir"])
    tr = json.loads((out / "train_result.json").read_text())
    assert tr["devices"]["strategy"] == "ddp" and tr["devices"]["devices"] == "2"
    assert tr["threads_per_rank"] == 1
    # global batch = 2 ranks x 2 rows x 64 bytes per step
    assert result["summary"]["bytes_seen"] == 8 * 2 * 2 * 64 and result["summary"]["steps"] == 8
    log = (out / "train.log").read_text()
    assert "GLOBAL_RANK: 1" in log or "Initializing distributed: GLOBAL_RANK: 1" in log


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killing_the_launcher_kills_the_training_process_group(ingest_result, tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import time

    root, ingest = ingest_result
    cfg = cfg_for(root, ["entropy.train.max_steps=100000", "entropy.train.val_every_n_steps=100000",
                         "wandb.mode=disabled"])
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_json_dict()))
    out = tmp_path / "out"
    script = ("import json, sys\n"
              "from blt_pipeline.config import config_from_dict\n"
              "from training.launch import launch_training\n"
              "cfg = config_from_dict(json.loads(open(sys.argv[1]).read()))\n"
              "launch_training('train_entropy', cfg, sys.argv[2], 'k' * 64, sys.argv[3])\n")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cfg.json"), str(out), ingest["dir"]],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists():
            assert parent.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent.pid)], capture_output=True, text=True)
        child = int(ps.stdout.split()[0])
        assert os.getpgid(child) == child, "training runs in its own process group"
        parent.send_signal(getattr(signal, sig))
        parent.wait(timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                os.killpg(child, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"training group {child} survived {sig} of its launcher"
            time.sleep(0.5)
    finally:
        if parent.poll() is None:
            parent.kill()
