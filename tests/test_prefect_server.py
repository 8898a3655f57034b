"""A real Prefect server, work pool, deployment and worker: a run created as the UI creates one, a failure,
and the UI's Retry finishing the run while reusing the stages that were done.

Everything it starts runs in its own process group and is stopped in ``finally`` blocks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from blt_pipeline.stage import read_manifest

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipeline import SMALL  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def wait_state(self, flow_run_id: str, final: set[str], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.call("GET", f"/flow_runs/{flow_run_id}")
            if run["state"] and run["state"]["type"] in final:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} not in {final} after {timeout_s} s: {run['state']}")


class Procs:
    """Background processes, each in its own session (process group), all stopped by ``stop_all``."""

    def __init__(self, logdir: Path):
        self.logdir, self.procs = logdir, []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=True)
        self.procs.append((name, p, log))
        return p

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop_all(self) -> None:
        # flow-run processes a worker starts live in their own sessions and may outlive it: collect every
        # descendant first, stop the groups we started, then kill what is left of the trees
        descendants = [pid for _, p, _ in self.procs for pid in _descendants(p.pid)]
        for _, p, log in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            log.close()
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _descendants(pid: int) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split("\n")[1:]
    children: dict[int, list[int]] = {}
    for line in ps:
        if line.strip():
            c, parent = map(int, line.split())
            children.setdefault(parent, []).append(c)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_deployment_run_fail_and_ui_retry(tmp_path):
    port = _free_port()
    api = Api(f"http://127.0.0.1:{port}/api")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop("BLT_PROJECT_DIR", None)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api.url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_WORKER_PREFETCH_SECONDS="2", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    prefect = [sys.executable, "-m", "prefect"]
    procs = Procs(tmp_path)
    workdir = tmp_path / "runs"
    # flows run in processes started by the worker, which may outlive it: find them by the workdir
    try:
        procs.start("server", prefect + ["server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        deadline = time.monotonic() + 180
        while True:
            try:
                if api.call("GET", "/health") is True:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, procs.log("server")
            time.sleep(1)

        def cli(*args: str) -> str:
            out = subprocess.run(prefect + list(args), env=env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=300)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            return out.stdout

        cli("work-pool", "create", "blt-process", "--type", "process")
        cli("--no-prompt", "deploy", "--name", "tiny-cpu")  # from prefect.yaml, BLT_PROJECT_DIR unset
        deps = api.call("POST", "/deployments/filter", {})
        dep = next(d for d in deps if d["name"] == "tiny-cpu")
        assert dep["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $BLT_PROJECT_DIR }}"}}]
        assert set(dep["parameter_openapi_schema"]["properties"]) == {"preset", "overrides", "workdir"}

        procs.start("worker", prefect + ["worker", "start", "--pool", "blt-process"],
                    {**env, "BLT_PROJECT_DIR": str(ROOT)})

        # A run as the UI's "Custom run" form creates it. Job variables inject a failure into train_blt
        # (BLT_FAIL_AFTER_STEPS; train_entropy trains exactly 10 steps, so the hook never fires there) and
        # turn off automatic task retries so the run fails.
        overrides = SMALL + ["entropy.train.max_steps=10", "entropy.train.val_every_n_steps=5"]
        run = api.call("POST", f"/deployments/{dep['id']}/create_flow_run", {
            "parameters": {"preset": "tiny", "overrides": overrides, "workdir": str(workdir)},
            "job_variables": {"env": {"BLT_FAIL_AFTER_STEPS": "10", "BLT_TRAIN_RETRIES": "0"}},
            "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
        })
        failed = api.wait_state(run["id"], {"FAILED", "CRASHED", "COMPLETED"}, timeout_s=900)
        assert failed["state"]["type"] == "FAILED", (failed["state"], procs.log("worker"))
        done_before = {}
        for stage in ("ingest", "train_entropy", "patch"):
            dirs = [d for d in (workdir / stage).glob("*") if d.is_dir() and read_manifest(d)]
            assert len(dirs) == 1, stage
            done_before[stage] = (dirs[0], read_manifest(dirs[0])["written_at"])
        blt_dirs = [d for d in (workdir / "train_blt").glob("*") if d.is_dir()]
        assert len(blt_dirs) == 1 and read_manifest(blt_dirs[0]) is None

        # The UI's Retry button
        api.call("POST", f"/flow_runs/{run['id']}/set_state", {
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"},
            "force": True,
        })
        final = api.wait_state(run["id"], {"FAILED", "CRASHED", "COMPLETED"}, timeout_s=900)
        assert final["state"]["type"] == "COMPLETED", (final["state"], procs.log("worker"))
        assert final["run_count"] >= 2
        for stage, (d, written) in done_before.items():
            assert read_manifest(d)["written_at"] == written, f"{stage} was rebuilt"
        assert read_manifest(blt_dirs[0]) is not None
        assert "resum" in (blt_dirs[0] / "train.log").read_text().lower()

        tasks = api.call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        by_stage: dict[str, list[str]] = {}
        for t in tasks:
            by_stage.setdefault(t["name"].rsplit("-", 1)[0], []).append(t["state"]["name"])
        for stage in ("ingest", "train_entropy", "patch"):  # the retry answered these from the cache
            assert "Cached" in by_stage[stage], by_stage
        arts = api.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        kinds = {(a["key"], a["type"]) for a in arts}
        assert ("tiny-summary", "markdown") in kinds and ("tiny-metrics", "table") in kinds, kinds
        assert any(a["type"] == "progress" for a in arts), kinds
        summary = [a for a in arts if a["key"] == "tiny-summary"]
        assert any("Completed" in a["data"] for a in summary)
    finally:
        procs.stop_all()
