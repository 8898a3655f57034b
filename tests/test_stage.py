"""Stage contract: keys, atomic writes, manifest-last completion, locking, killed builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blt_pipeline.stage import (
    MANIFEST,
    atomic_path,
    atomic_write_json,
    read_manifest,
    run_stage,
    stage_dir,
    stage_key,
)


def test_key_is_canonical_and_sensitive():
    a = stage_key("s", {"x": 1, "y": [1, 2]}, {"up": "k"}, "1")
    assert a == stage_key("s", {"y": [1, 2], "x": 1}, {"up": "k"}, "1")
    assert a != stage_key("s", {"x": 2, "y": [1, 2]}, {"up": "k"}, "1")
    assert a != stage_key("s", {"x": 1, "y": [1, 2]}, {"up": "k2"}, "1")
    assert a != stage_key("s", {"x": 1, "y": [1, 2]}, {"up": "k"}, "2")
    assert stage_dir("/w", "s", a) == Path("/w/s") / a[:16]


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_run_stage_builds_once_then_returns_cached(tmp_path):
    calls = []

    def build(d: Path):
        calls.append(d)
        (d / "out.txt").write_text("hello")
        return {"files": {"out.txt": {}}, "summary": {"n": 1}}

    r1 = run_stage("demo", tmp_path, {"a": 1}, None, "1", build)
    r2 = run_stage("demo", tmp_path, {"a": 1}, None, "1", build)
    assert len(calls) == 1 and not r1["cached"] and r2["cached"]
    assert r1["key"] == r2["key"] and r2["summary"] == {"n": 1}
    m = read_manifest(r1["dir"], r1["key"])
    assert m["stage"] == "demo" and m["config"] == {"a": 1} and m["complete"] is True


def test_missing_output_file_makes_stage_incomplete(tmp_path):
    def build(d: Path):
        (d / "out.txt").write_text("x")
        return {"files": {"out.txt": {}}}

    r = run_stage("demo", tmp_path, {}, None, "1", build)
    os.unlink(Path(r["dir"]) / "out.txt")
    assert read_manifest(r["dir"], r["key"]) is None
    assert not run_stage("demo", tmp_path, {}, None, "1", build)["cached"]


def test_failed_build_leaves_no_manifest(tmp_path):
    def build(d: Path):
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        run_stage("demo", tmp_path, {}, None, "1", build)
    d = next(p for p in (tmp_path / "demo").iterdir() if p.is_dir())
    assert d.is_dir() and not (d / MANIFEST).exists()


_SLOW_STAGE = """
import sys, time
from pathlib import Path
from blt_pipeline.stage import run_stage
def build(d):
    with open(Path(sys.argv[2]), "a") as f:
        f.write("built\\n")
    (d / "part.txt").write_text("partial")
    time.sleep(float(sys.argv[3]))
    (d / "out.txt").write_text("done")
    return {"files": {"out.txt": {}}}
r = run_stage("slow", sys.argv[1], {"a": 1}, None, "1", build)
print("cached" if r["cached"] else "built")
"""


def _run_slow(workdir, log, sleep):
    return subprocess.Popen([sys.executable, "-c", _SLOW_STAGE, str(workdir), str(log), str(sleep)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


def test_killed_build_is_not_complete_and_reruns(tmp_path):
    log = tmp_path / "log.txt"
    p = _run_slow(tmp_path / "w", log, 30)
    for _ in range(200):
        if log.exists():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    d = next(p for p in (tmp_path / "w" / "slow").iterdir() if p.is_dir())
    assert read_manifest(d) is None
    out = _run_slow(tmp_path / "w", log, 0).communicate()[0]
    assert out.strip() == "built" and read_manifest(d) is not None


def test_concurrent_runs_build_once(tmp_path):
    log = tmp_path / "log.txt"
    procs = [_run_slow(tmp_path / "w", log, 2) for _ in range(2)]
    outs = sorted(p.communicate()[0].strip() for p in procs)
    assert outs == ["built", "cached"]
    assert log.read_text().count("built") == 1


