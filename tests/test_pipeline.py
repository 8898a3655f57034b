"""The pipeline flow: stage chaining, Prefect caching by stage key, resume, artifacts, concurrency.

Two layers of tests: fast ones with stand-in stages (the caching logic itself, in seconds) and an end-to-end
run of the real stages on a shrunken ``tiny`` preset (completion, a second run executing nothing, resume of
an interrupted ``train_blt`` to the same weights as an uninterrupted run).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from blt_pipeline.config import ConfigError, PipelineConfig, load_config
from blt_pipeline.stage import read_manifest, run_stage, stage_key
from flows import tasks as T

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ stand-in stages
class FakeStages:
    """Stage functions with the real signatures, built on run_stage, that count their builds."""

    def __init__(self) -> None:
        self.builds: dict[str, int] = {}
        self.fail: set[str] = set()

    def _section(self, cfg: PipelineConfig, stage: str):
        return {"ingest": cfg.data, "train_entropy": cfg.entropy, "patch": cfg.patch, "train_blt": cfg.blt,
                "evaluate": cfg.eval}[stage]

    def key_for(self, stage):
        def key_for(cfg, *ups):
            inputs = {n: u["key"] for n, u in zip(T.UPSTREAM[stage], ups)}
            return stage_key(stage, self._section(cfg, stage), inputs, "1")
        return key_for

    def runner(self, stage):
        def run(cfg, *ups):
            inputs = {n: u["key"] for n, u in zip(T.UPSTREAM[stage], ups)}

            def build(d: Path):
                if stage in self.fail:
                    raise RuntimeError(f"{stage} lost its node")  # an 'infrastructure' failure
                self.builds[stage] = self.builds.get(stage, 0) + 1
                (d / "out.json").write_text(json.dumps({"stage": stage}))
                return {"files": {"out.json": {}}, "summary": {"val_bpb": 1.5, "bytes_per_patch": 4.4}}

            return run_stage(stage, cfg.workdir, self._section(cfg, stage), inputs, "1", build)
        return run


@pytest.fixture
def fake_stages(monkeypatch):
    fake = FakeStages()
    runners = {}
    for stage in T.STAGES:
        name = f"_fake_stage_{stage}"
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        setattr(mod, "run", fake.runner(stage))
        mod.key_for = fake.key_for(stage)
        monkeypatch.setitem(sys.modules, name, mod)
        runners[stage] = (name, "run")
    monkeypatch.setattr(T, "RUNNERS", runners)
    monkeypatch.setenv("BLT_TRAIN_RETRIES", "0")
    return fake


def _statuses(result):
    return {s: r["run"]["status"] for s, r in result["stages"].items()}


def test_cache_layers_with_stand_in_stages(prefect_harness, fake_stages, tmp_path):
    from flows.pipeline import blt_pipeline

    cfg = load_config("tiny", workdir=str(tmp_path / "w"))
    r1 = blt_pipeline(cfg)
    assert _statuses(r1) == dict.fromkeys(T.STAGES, "ran")
    assert fake_stages.builds == dict.fromkeys(T.STAGES, 1)
    assert all(r["run"]["key_matches"] for r in r1["stages"].values())
    # a new flow run with the same config: every stage answered by Prefect's cache, no body runs
    r2 = blt_pipeline(cfg)
    assert _statuses(r2) == dict.fromkeys(T.STAGES, "cached")
    assert fake_stages.builds == dict.fromkeys(T.STAGES, 1)
    assert {s: r["key"] for s, r in r2["stages"].items()} == {s: r["key"] for s, r in r1["stages"].items()}
    # a deleted stage directory: the Prefect record must not lie; that stage is rebuilt, downstream reused
    shutil.rmtree(r1["stages"]["patch"]["dir"])
    r3 = blt_pipeline(cfg)
    assert _statuses(r3)["patch"] == "ran" and fake_stages.builds["patch"] == 2
    assert read_manifest(r3["stages"]["patch"]["dir"], r3["stages"]["patch"]["key"]) is not None
    assert {_statuses(r3)[s] for s in ("ingest", "train_entropy", "train_blt", "evaluate")} == {"cached"}
    # a directory rebuilt behind Prefect's back (another tool): the record is refreshed from disk
    shutil.rmtree(r1["stages"]["ingest"]["dir"])
    T._call_stage("ingest", cfg, [])  # rebuild outside Prefect
    r4 = blt_pipeline(cfg)
    assert _statuses(r4)["ingest"] == "reused"
    assert r4["stages"]["ingest"]["written_at"] == read_manifest(r4["stages"]["ingest"]["dir"])["written_at"]
    # a changed config re-keys only the stages it feeds
    cfg2 = load_config("tiny", ["blt.train.max_steps=7"], workdir=str(tmp_path / "w"))
    r5 = blt_pipeline(cfg2)
    assert _statuses(r5) == {"ingest": "cached", "train_entropy": "cached", "patch": "cached",
                             "train_blt": "ran", "evaluate": "ran"}


def test_failed_stage_then_rerun_runs_only_what_failed(prefect_harness, fake_stages, tmp_path):
    from flows.pipeline import blt_pipeline

    cfg = load_config("tiny", workdir=str(tmp_path / "w"))
    fake_stages.fail.add("train_blt")
    with pytest.raises(RuntimeError, match="lost its node"):
        blt_pipeline(cfg)
    fake_stages.fail.clear()
    r = blt_pipeline(cfg)
    assert _statuses(r) == {"ingest": "cached", "train_entropy": "cached", "patch": "cached",
                            "train_blt": "ran", "evaluate": "ran"}


def test_retry_condition_is_infrastructure_only():
    from prefect.states import Failed

    def state(exc):
        return Failed(data=exc)

    assert T.retry_on_infrastructure(None, None, state(RuntimeError("NCCL timeout")))
    assert T.retry_on_infrastructure(None, None, state(OSError("disk hiccup")))
    assert not T.retry_on_infrastructure(None, None, state(ConfigError("bad key")))
    assert not T.retry_on_infrastructure(None, None, state(ValueError("bad value")))
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["blt.train.nope=1"])
    assert not T.retry_on_infrastructure(None, None, state(info.value))


def test_placeholder_evaluate_says_so_and_has_no_numbers(prefect_harness, fake_stages, tmp_path, monkeypatch):
    from flows.artifacts import format_summary, summary_markdown
    from flows.pipeline import blt_pipeline

    monkeypatch.setattr(T, "stage_available", lambda s: s != "evaluate")
    cfg = load_config("tiny", workdir=str(tmp_path / "w"))
    r = blt_pipeline(cfg)
    ev = r["stages"]["evaluate"]
    assert ev["placeholder"] and ev["summary"] == {} and "not implemented" in ev["message"]
    assert "placeholder" in format_summary(r) and "placeholder" in summary_markdown(r)
    assert "eval_blt_bpb" not in r["headline"]


def test_summary_lists_outputs_and_headline(tmp_path):
    from flows.artifacts import format_summary, metrics_table, summary_markdown

    wb = tmp_path / "train_blt" / "k" / "wandb" / "offline-run-20260101_000000-abc"
    wb.mkdir(parents=True)
    result = {
        "name": "t", "workdir": str(tmp_path), "state": "Completed", "seconds": 3.0,
        "stages": {
            "train_entropy": {"key": "a" * 64, "dir": "/x/e", "summary": {"val_bpb": 2.1},
                              "run": {"status": "ran", "seconds": 1.0}},
            "patch": {"key": "b" * 64, "dir": "/x/p", "summary": {"bytes_per_patch": 4.5},
                      "run": {"status": "cached", "seconds": 0.1}},
            "train_blt": {"key": "c" * 64, "dir": str(wb.parent.parent), "summary": {"val_bpb": 1.9},
                          "run": {"status": "reused", "seconds": 0.2}},
        },
        "wandb_dirs": [str(wb)],
    }
    from flows.artifacts import headline

    result["headline"] = headline(result)
    assert result["headline"] == {"entropy_val_bpb": 2.1, "bytes_per_patch": 4.5, "blt_val_bpb": 1.9}
    text = format_summary(result)
    assert "wandb sync" in summary_markdown(result) and str(wb) in text and "4.5000" in text
    assert {r["stage"] for r in metrics_table(result)} == {"train_entropy", "patch", "train_blt"}


def test_prefect_yaml_deployments_are_portable_and_in_sync():
    import yaml

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert doc["build"] is None and doc["push"] is None
    text = (ROOT / "prefect.yaml").read_text()
    assert "/work/" not in text and "/home/" not in text and "/root" not in text
    deps = {d["name"]: d for d in doc["deployments"]}
    assert {"tiny-cpu", "small-gpu"} <= set(deps)
    for d in doc["deployments"]:
        module, func = d["entrypoint"].split(":")
        mod_path = ROOT / module
        assert mod_path.exists() or d["name"].startswith(("ingest", "train", "patch", "evaluate")), d["name"]
        assert d["work_pool"]["name"] == "blt-process"
        if "config" in (d.get("parameters") or {}):
            # full-config defaults (stage deployments) must equal a preset exactly
            cfg = PipelineConfig.model_validate(d["parameters"]["config"])
            assert cfg == load_config(cfg.name), f"{d['name']}: parameters drifted from configs/{cfg.name}.yaml"
        else:
            load_config(d["parameters"]["preset"], d["parameters"].get("overrides") or [])


# ------------------------------------------------------------------------------------ the real stages
SMALL = [
    "data.default_corpus_bytes=300000", "data.shard_bytes=200000",
    "entropy.model.shape={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}",
    "entropy.model.window=64", "entropy.model.max_seqlen=512",
    "entropy.train.seq_len=128", "entropy.train.batch_size=4", "entropy.train.max_steps=20",
    "entropy.train.warmup_steps=2", "entropy.train.lr=0.005", "entropy.train.val_every_n_steps=10",
    "entropy.train.val_batches=2", "entropy.train.ckpt_every_n_steps=10", "entropy.train.log_every_n_steps=5",
    "patch.calibration_docs=16", "patch.chunk_len=512", "patch.batch_size=4",
    "blt.model.encoder={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}",
    "blt.model.global={dim: 64, n_layers: 1, n_heads: 2, ffn_dim: 128}",
    "blt.model.decoder={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64}",
    "blt.model.hash_vocab=256", "blt.model.window=64", "blt.model.max_seqlen=512",
    "blt.train.seq_len=16", "blt.train.max_bytes_per_row=128", "blt.train.batch_size=4",
    "blt.train.max_steps=20", "blt.train.warmup_steps=2", "blt.train.val_every_n_steps=10",
    "blt.train.val_batches=2", "blt.train.ckpt_every_n_steps=5", "blt.train.log_every_n_steps=5",
    "eval.baseline=false", "eval.max_val_bytes=20000", "eval.samples=1", "eval.generate_bytes=16",
    "wandb.mode=offline",
]
REAL = ("ingest", "train_entropy", "patch", "train_blt")


def small_config(workdir: Path, extra: list[str] | None = None) -> PipelineConfig:
    return load_config("tiny", SMALL + (extra or []), workdir=str(workdir))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_harness):
    from flows.pipeline import run_pipeline

    cfg = small_config(tmp_path_factory.mktemp("pipeline") / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLT_TRAIN_RETRIES", "0")  # a failure here should fail the test, not back off and retry
        started = time.monotonic()
        result = run_pipeline(cfg)
        wall = time.monotonic() - started
    return cfg, result, wall


def _written_at(result) -> dict[str, str]:
    return {s: read_manifest(r["dir"])["written_at"] for s, r in result["stages"].items() if r.get("dir")}


def test_pipeline_completes_on_cpu(first_run):
    from flows.artifacts import format_summary

    cfg, result, wall = first_run
    assert result["state"] == "Completed"
    for stage in REAL:
        r = result["stages"][stage]
        assert r["run"]["status"] == "ran", (stage, r["run"])
        assert r["run"]["key_matches"], stage  # the Prefect cache key is the stage key
        assert read_manifest(r["dir"], r["key"]) is not None, stage
    ev = result["stages"]["evaluate"]
    if ev.get("placeholder"):
        assert ev["summary"] == {} and "not implemented" in ev["message"]
    else:
        assert read_manifest(ev["dir"], ev["key"]) is not None
    h = result["headline"]
    assert {"entropy_val_bpb", "bytes_per_patch", "blt_val_bpb"} <= set(h), h
    assert result["wandb_dirs"], "offline W&B runs are listed for `wandb sync`"
    text = format_summary(result)
    assert result["stages"]["train_blt"]["dir"] in text and "wandb sync" in text
    print(f"\nfirst run: {wall:.1f} s\n{text}")


def test_second_run_executes_no_stage(first_run):
    from flows.pipeline import run_pipeline

    cfg, first, _ = first_run
    before = _written_at(first)
    started = time.monotonic()
    again = run_pipeline(cfg)
    wall = time.monotonic() - started
    statuses = _statuses(again)
    assert all(statuses[s] == "cached" for s in REAL), statuses  # no task body ran
    assert statuses["evaluate"] in ("cached", "placeholder")
    assert _written_at(again) == before  # and no stage directory was rebuilt
    assert wall < 15, f"second run took {wall:.1f} s"


def test_interrupted_train_blt_resumes_to_the_same_weights(first_run, tmp_path, monkeypatch):
    import torch

    from flows.pipeline import run_pipeline

    cfg, first, _ = first_run
    workdir = tmp_path / "runs"
    # same config in a fresh workdir, upstream stages copied (keys do not depend on the workdir)
    for stage in ("ingest", "train_entropy", "patch"):
        src = Path(first["stages"][stage]["dir"])
        shutil.copytree(src, workdir / stage / src.name)
    # W&B stays offline: the failed run is closed by the training process, so the rerun resumes its run id
    cfg_b = load_config("tiny", SMALL + ["wandb.mode=offline"], workdir=str(workdir))
    monkeypatch.setenv("BLT_TRAIN_RETRIES", "0")  # the injected failure must fail the flow run
    monkeypatch.setenv("BLT_FAIL_AFTER_STEPS", "10")  # only train_blt trains here: upstream is complete
    with pytest.raises(Exception, match="exited with code|InjectedFailure|injected"):
        run_pipeline(cfg_b)
    blt_dir = workdir / "train_blt" / Path(first["stages"]["train_blt"]["dir"]).name
    assert read_manifest(blt_dir) is None and (blt_dir / "checkpoints").exists()
    monkeypatch.delenv("BLT_FAIL_AFTER_STEPS")
    result = run_pipeline(cfg_b)
    statuses = _statuses(result)
    assert statuses["train_blt"] == "ran"
    assert all(statuses[s] in ("cached", "reused") for s in ("ingest", "train_entropy", "patch")), statuses
    assert "resum" in (blt_dir / "train.log").read_text().lower()
    a = torch.load(Path(first["stages"]["train_blt"]["dir"]) / "model.pt", map_location="cpu", weights_only=False)
    b = torch.load(blt_dir / "model.pt", map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


# ------------------------------------------------------------------------------------ faults
def _ingest_script(workdir: Path, corpus_bytes: int) -> str:
    return (
        "import json, sys\n"
        "from blt_pipeline.config import load_config\n"
        "from data.ingest import run_ingest\n"
        f"cfg = load_config('tiny', ['data.default_corpus_bytes={corpus_bytes}'], workdir={str(workdir)!r})\n"
        "r = run_ingest(cfg)\n"
        "print(json.dumps({'cached': r['cached'], 'key': r['key'], 'dir': r['dir']}))\n"
    )


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_two_concurrent_runs_build_a_stage_once(tmp_path):
    script = _ingest_script(tmp_path / "runs", 3_000_000)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=ROOT) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["key"] == outs[1]["key"]
    assert sorted(o["cached"] for o in outs) == [False, True]  # one built, the other waited and reused
    assert read_manifest(outs[0]["dir"], outs[0]["key"]) is not None
    assert not list(Path(outs[0]["dir"]).rglob(".*.tmp"))


def test_sigkilled_stage_leaves_nothing_complete(tmp_path):
    workdir = tmp_path / "runs"
    script = _ingest_script(workdir, 4_000_000)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any((workdir / "ingest").glob("*/train")):
        time.sleep(0.01)
    p.kill()
    p.wait()
    dirs = [d for d in (workdir / "ingest").glob("*") if d.is_dir()]
    assert dirs and all(read_manifest(d) is None for d in dirs), "a killed build must not look complete"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["cached"] is False and read_manifest(r["dir"], r["key"]) is not None


def _training_procs(workdir: Path) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "training.run" in line and str(workdir) in line]


def test_ctrl_c_on_blt_run_stops_training(tmp_path):
    """SIGINT to `blt run` while train_entropy trains: the CLI exits and no training process survives."""
    workdir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "blt_pipeline.cli", "run", "--workdir", str(workdir)]
    for item in SMALL + ["entropy.train.max_steps=5000", "wandb.mode=disabled"]:
        cmd += ["--set", item]
    log = open(tmp_path / "blt-run.log", "w+")  # a file, not a pipe: nobody reads it while it runs
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                         start_new_session=True, text=True)
    try:
        deadline = time.monotonic() + 240
        t0 = time.monotonic()
        while time.monotonic() < deadline and p.poll() is None and not _training_procs(workdir):
            time.sleep(0.5)
        time.sleep(2)  # let it get into the training loop
        metrics = next((workdir / "train_entropy").glob("*/run_config.json"), None)
        assert p.poll() is None and _training_procs(workdir), "training did not start"
        t1 = time.monotonic()
        p.send_signal(2)  # what Ctrl-C sends to the foreground process
        p.wait(timeout=60)
        out = (tmp_path / "blt-run.log").read_text()
        print(f"training started after {t1 - t0:.1f} s; `blt run` exited {time.monotonic() - t1:.1f} s after SIGINT")
        assert p.returncode != 0, out[-2000:]
        time.sleep(1)
        assert not _training_procs(workdir), "a training process survived Ctrl-C"
        assert read_manifest(metrics.parent) is None
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
        log.close()
