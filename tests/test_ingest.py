"""The ingest stage: sources -> Arrow doc shards, byte-exact, deterministic, bounded, crash-safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blt_pipeline.config import PipelineConfig
from blt_pipeline.stage import find_complete, read_manifest
from data.default_corpus import default_corpus_files, stdlib_root
from data.ingest import IngestError, run_ingest, split_of
from data.shards import iter_docs, list_shards, read_shard, verify_shards

ROOT = Path(__file__).resolve().parent.parent


def make_cfg(tmp_path, sources, workdir="wd", **data) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"workdir": str(tmp_path / workdir), "data": {"sources": sources, **data}})


def files_src(*paths, **kw) -> dict:
    return {"kind": "files", "paths": [str(p) for p in paths], **kw}


def all_docs(res) -> dict[str, tuple[str, bytes, str]]:
    out = {}
    for split in ("train", "val"):
        for d in iter_docs(res["dir"], split):
            assert d.doc_id not in out
            out[d.doc_id] = (d.source, bytes(d.data), split)
    return out


def manifest(res) -> dict:
    return json.loads(Path(res["manifest"]).read_text())


# ------------------------------------------------------------------------------------------ byte exactness
def test_roundtrip_arbitrary_bytes(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    payloads = {
        "all256.bin": bytes(range(256)) * 3,
        "invalid_utf8.txt": b"caf\xc3\xa9 \xff\xfe\xc3( \xed\xa0\x80 end",
        "nul.txt": b"\x00" * 17 + b"a\x00b",
        "crlf.md": b"line1\r\nline2\rline3\n\n",
        "sub/latin1.py": "# -*- coding: latin-1 -*-\nx = 'é'\n".encode("latin-1"),
        "sub/noext": bytes(reversed(range(256))),
    }
    for name, data in payloads.items():
        (src / name).write_bytes(data)
    res = run_ingest(make_cfg(tmp_path, [files_src(src)], val_fraction=0.3))
    assert res["cached"] is False
    docs = all_docs(res)
    assert {k: v[1] for k, v in docs.items()} == {f"files:{src.as_posix()}/{n}": d for n, d in payloads.items()}
    assert {v[0] for v in docs.values()} == {"files"}
    m = manifest(res)
    assert m["summary"]["docs"] == len(payloads)
    assert m["summary"]["bytes"] == sum(map(len, payloads.values()))
    assert m["sources"]["files"]["files"] == len(payloads)
    # schema as contracted
    t = read_shard(list_shards(res["dir"], "train")[0])
    assert t.schema.names == ["doc_id", "source", "data"]
    assert t.schema.field("data").type == pa.large_binary()
    assert t.schema.field("doc_id").type == pa.string()


def test_fifty_megabyte_line(tmp_path):
    line = (b"x" * 1023 + b"\xff") * (50 * 1024)  # 50 MB, no newline, not UTF-8
    (tmp_path / "big.txt").write_bytes(line)
    (tmp_path / "big.jsonl").write_bytes(json.dumps({"text": "y" * (50 << 20)}).encode() + b"\n")
    res = run_ingest(make_cfg(tmp_path, [files_src(tmp_path / "big.txt", tmp_path / "big.jsonl")],
                              shard_bytes=8 << 20))
    docs = all_docs(res)
    assert docs[f"files:{(tmp_path / 'big.txt').as_posix()}"][1] == line
    assert docs[f"files:{(tmp_path / 'big.jsonl').as_posix()}#L1"][1] == b"y" * (50 << 20)
    assert manifest(res)["summary"]["shards"] == 2  # one oversized document per shard


# ------------------------------------------------------------------------------------------ split, re-run
def test_split_is_deterministic_across_runs_and_orders(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [f"doc{i:03d}.txt" for i in range(60)]
    for n in names:
        (src / n).write_bytes(n.encode() * 20)
    paths = [src / n for n in names]
    a = all_docs(run_ingest(make_cfg(tmp_path, [files_src(*paths)], "wa", val_fraction=0.3)))
    b = all_docs(run_ingest(make_cfg(tmp_path, [files_src(*reversed(paths))], "wb", val_fraction=0.3,
                                     shard_bytes=500)))
    assert a.keys() == b.keys()
    assert {k: v[2] for k, v in a.items()} == {k: v[2] for k, v in b.items()}
    assert {k: v[2] for k, v in a.items()} == {k: split_of(k, 0.3) for k in a}
    n_val = sum(v[2] == "val" for v in a.values())
    assert 5 <= n_val <= 35  # ~30% of 60 (the hash is fixed, so this is exact and stable)
    assert split_of("x", 0.0) == "train"


def _snapshot(d: str) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in Path(d).rglob("*") if p.is_file()}


def test_rerun_is_a_noop_and_source_change_rebuilds(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.txt").write_bytes(os.urandom(2000))
    cfg = make_cfg(tmp_path, [files_src(src)], shard_bytes=5000)
    first = run_ingest(cfg)
    snap, text = _snapshot(first["dir"]), Path(first["manifest"]).read_text()
    time.sleep(0.01)
    again = run_ingest(cfg)
    assert again["cached"] is True and again["dir"] == first["dir"] and again["key"] == first["key"]
    assert _snapshot(first["dir"]) == snap
    assert Path(first["manifest"]).read_text() == text
    assert again["summary"] == first["summary"]
    # a changed source file changes the fingerprint, so the key and the directory
    (src / "3.txt").write_bytes(b"changed")
    third = run_ingest(cfg)
    assert third["cached"] is False and third["key"] != first["key"]
    assert all_docs(third)[f"files:{src.as_posix()}/3.txt"][1] == b"changed"
    assert manifest(third)["fingerprints"] != manifest(first)["fingerprints"]


# ------------------------------------------------------------------------------------------ bad input
def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(IngestError, match=str(missing)) as err:
        run_ingest(make_cfg(tmp_path, [files_src(missing)]))
    assert "\n" not in str(err.value)
    with pytest.raises(IngestError, match="no files match"):
        run_ingest(make_cfg(tmp_path, [files_src(tmp_path / "*.nothing")]))
    assert not (tmp_path / "wd").exists() or not find_complete(tmp_path / "wd", "ingest")


def test_empty_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"hello")
    (tmp_path / "c.jsonl").write_bytes(b'{"text": ""}\n{"text": null}\n{"text": "ok"}\n\n')
    (tmp_path / "d.txt").write_bytes(b"hi")
    res = run_ingest(make_cfg(tmp_path, [files_src(tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl",
                                                   tmp_path / "d.txt")], min_doc_bytes=3))
    src = manifest(res)["sources"]["files"]
    assert src["skipped_empty"] == 3 and src["skipped_short"] == 2  # "hi" and "ok" are under 3 bytes
    assert src["docs"] == 1 and src["files"] == 4
    assert [v[1] for v in all_docs(res).values()] == [b"hello"]
    assert manifest(res)["summary"]["skipped_empty"] == 3


def test_unreadable_inputs_name_the_path(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "ok.txt").write_bytes(b"fine")
    os.symlink(tmp_path / "gone.txt", d / "dangling.txt")
    with pytest.raises(IngestError, match="dangling.txt") as err:
        run_ingest(make_cfg(tmp_path, [files_src(d)]))
    assert "cannot read" in str(err.value)
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(IngestError, match="pipe.txt.*not a regular file"):
        run_ingest(make_cfg(tmp_path, [files_src(fifo)]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_names_the_file(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_bytes(b"x")
    p.chmod(0)
    with pytest.raises(IngestError, match="secret.txt.*[Pp]ermission denied"):
        run_ingest(make_cfg(tmp_path, [files_src(p)]))


def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "recs.jsonl"
    p.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "thr\n{"text": "four"}\n[1]\n{"body": "x"}\n')
    with pytest.raises(IngestError, match=rf"{p}:3: bad record \(invalid JSON") as err:
        run_ingest(make_cfg(tmp_path, [files_src(p)]))
    assert "\n" not in str(err.value)
    res = run_ingest(make_cfg(tmp_path, [files_src(p, on_bad_record="skip")]))
    docs = all_docs(res)
    assert sorted(v[1] for v in docs.values()) == [b"four", b"one", b"two"]
    assert f"files:{p.as_posix()}#L4" in docs
    assert manifest(res)["sources"]["files"]["skipped_bad_records"] == 3  # bad JSON, not an object, no field


def test_invalid_utf8_in_jsonl_is_a_bad_record(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(IngestError, match=":2: bad record"):
        run_ingest(make_cfg(tmp_path, [files_src(p)]))


def test_hub_offline_fails_at_once(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, [{"kind": "hub", "name": "roneneldan/TinyStories"}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(IngestError, match="unreachable.*offline.*local files") as err:
        run_ingest(cfg)
    assert "\n" not in str(err.value)
    # without the offline flags: a fast reachability check (here: a closed local port)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(IngestError, match="hub unreachable.*127.0.0.1:9.*local files"):
        run_ingest(cfg)
    assert time.monotonic() - t0 < 6


# ------------------------------------------------------------------------------------------ formats
def test_jsonl_json_parquet_text_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "alpha", "k": 1}\n\n{"body": "béta", "k": 2}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"body": "gamma"}, {"body": "delta\u0000"}]))
    (tmp_path / "c.json").write_text('{"body": "lines in .json"}\n')
    pq.write_table(pa.table({"body": ["pa", None, "rq"], "k": [7, 8, 9]}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"body": pa.array([b"\xff\x00bin"], pa.binary())}), tmp_path / "e.parquet")
    res = run_ingest(make_cfg(tmp_path, [files_src(tmp_path / "*.json*", tmp_path / "*.parquet",
                                                   text_field="body")]))
    got = {k: v[1] for k, v in all_docs(res).items()}
    base = f"files:{tmp_path.as_posix()}"
    assert got == {
        f"{base}/a.jsonl#L1": b"alpha", f"{base}/a.jsonl#L3": "béta".encode(),
        f"{base}/b.json#0": b"gamma", f"{base}/b.json#1": b"delta\x00",
        f"{base}/c.json#L1": b"lines in .json",
        f"{base}/d.parquet#0": b"pa", f"{base}/d.parquet#2": b"rq",
        f"{base}/e.parquet#0": b"\xff\x00bin",
    }
    assert manifest(res)["sources"]["files"]["skipped_empty"] == 1  # the null parquet text
    # id_field: ids come from the data
    res = run_ingest(make_cfg(tmp_path, [files_src(tmp_path / "a.jsonl", tmp_path / "d.parquet",
                                                   text_field="body", id_field="k")], "wid"))
    assert sorted(all_docs(res)) == ["files:1", "files:2", "files:7", "files:9"]
    with pytest.raises(IngestError, match="d.parquet: no column 'text'"):
        run_ingest(make_cfg(tmp_path, [files_src(tmp_path / "d.parquet")], "wbad"))


# ------------------------------------------------------------------------------------------ default corpus
def test_default_corpus_is_deterministic_and_real(tmp_path):
    cfg_a = make_cfg(tmp_path, [{"kind": "default"}], "wa", default_corpus_bytes=300_000, val_fraction=0.1)
    cfg_b = make_cfg(tmp_path, [], "wb", default_corpus_bytes=300_000, val_fraction=0.1)  # none = default
    a, b = run_ingest(cfg_a), run_ingest(cfg_b)
    ma, mb = manifest(a), manifest(b)
    assert {k: v["sha256"] for k, v in ma["files"].items()} == {k: v["sha256"] for k, v in mb["files"].items()}
    docs = all_docs(a)
    assert 0 < ma["summary"]["bytes"] <= 300_000 and len(docs) > 5
    root = stdlib_root()
    for doc_id, (source, data, _) in docs.items():
        assert source == "default" and doc_id.startswith("default:")
        assert (root / doc_id.removeprefix("default:")).read_bytes() == data
    listed = default_corpus_files(300_000)
    assert [f.rel for f in listed] == sorted(f.rel for f in listed)
    assert all("site-packages" not in f.rel and "/test/" not in f"/{f.rel}" for f in listed)
    assert any(f.rel.endswith(".py") for f in listed)


# ------------------------------------------------------------------------------------------ limits, shards
def _make_docs(d: Path, n: int, size: int, prefix: str) -> Path:
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"{prefix}{i:03d}.txt").write_bytes(bytes([65 + i % 26]) * size)
    return d


def test_weights_and_limits(tmp_path):
    a = _make_docs(tmp_path / "a", 50, 1000, "a")
    b = _make_docs(tmp_path / "b", 50, 1000, "b")
    res = run_ingest(make_cfg(tmp_path, [files_src(a, weight=3), files_src(b, weight=1)],
                              max_total_bytes=20_000))
    src = manifest(res)["sources"]
    assert list(src) == ["files", "files#2"]
    assert (src["files"]["bytes"], src["files"]["budget_bytes"], src["files"]["stopped_by"]) == \
        (15_000, 15_000, "max_total_bytes")
    assert (src["files#2"]["bytes"], src["files#2"]["stopped_by"]) == (5_000, "max_total_bytes")
    assert {v[0] for v in all_docs(res).values()} == {"files", "files#2"}
    res = run_ingest(make_cfg(tmp_path, [files_src(a, max_docs=7), files_src(b, max_bytes=4_500)], "w2"))
    src = manifest(res)["sources"]
    assert (src["files"]["docs"], src["files"]["stopped_by"]) == (7, "max_docs")
    assert (src["files#2"]["docs"], src["files#2"]["bytes"], src["files#2"]["stopped_by"]) == \
        (4, 4000, "max_bytes")
    # the first documents in order are the ones taken
    assert sorted(k.rsplit("/", 1)[1] for k in all_docs(res) if k.startswith("files:")) == \
        [f"a{i:03d}.txt" for i in range(7)]


def _rejoin(docs: dict) -> dict[str, bytes]:
    parts: dict[str, list] = defaultdict(list)
    for doc_id, (_, data, _) in docs.items():
        base, _, k = doc_id.rpartition("@")
        if base and k.isdigit():
            parts[base].append((int(k), data))
        else:
            parts[doc_id].append((0, data))
    return {k: b"".join(d for _, d in sorted(v)) for k, v in parts.items()}


def test_shard_multiple_pads_with_nonempty_shards(tmp_path):
    src = _make_docs(tmp_path / "src", 23, 1000, "d")
    originals = {f"files:{src.as_posix()}/d{i:03d}.txt": bytes([65 + i % 26]) * 1000 for i in range(23)}
    res = run_ingest(make_cfg(tmp_path, [files_src(src)], shard_bytes=4000, shard_multiple=4, val_fraction=0.15))
    m = manifest(res)
    for split in ("train", "val"):
        shards = list_shards(res["dir"], split)
        assert len(shards) % 4 == 0 and m["splits"][split]["shards"] == len(shards)
        assert [p.name for p in shards] == [f"shard-{i:05d}.arrow" for i in range(len(shards))]
        assert all(read_shard(p).num_rows > 0 for p in shards)
        assert all(m["files"][f"{split}/{p.name}"]["bytes"] > 0 for p in shards)
    assert m["splits"]["val"]["docs"] >= 1
    verify_shards(res["dir"])
    assert _rejoin(all_docs(res)) == originals  # nothing lost or altered, parts rejoin in order
    assert not list(Path(res["dir"]).rglob(".*"))  # no temp/rebalance leftovers
    # fewer bytes than shards: a clear error
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"ab")
    with pytest.raises(IngestError, match="shard_multiple=4"):
        run_ingest(make_cfg(tmp_path, [files_src(tiny)], "w2", shard_multiple=4, val_fraction=0))


def test_max_doc_bytes_splits_into_parts(tmp_path):
    p = tmp_path / "long.bin"
    data = os.urandom(10_000)
    p.write_bytes(data)
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "z" * 2500}) + "\n")
    res = run_ingest(make_cfg(tmp_path, [files_src(p, tmp_path / "r.jsonl")], max_doc_bytes=3000))
    docs = all_docs(res)
    ids = sorted(k for k in docs if "long.bin" in k)
    assert ids == [f"files:{p.as_posix()}@{k}" for k in range(4)]
    assert len({docs[k][2] for k in ids}) == 1  # all parts in the same split
    assert b"".join(docs[k][1] for k in ids) == data
    assert docs[f"files:{(tmp_path / 'r.jsonl').as_posix()}#L1"][1] == b"z" * 2500


# ------------------------------------------------------------------------------------------ crash safety
CHILD = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from blt_pipeline.config import PipelineConfig
    import data.shards as shards
    from data.ingest import run_ingest

    original = shards.ShardWriter.write_batch
    calls = [0]
    def slow_write_batch(self, batch):  # the test's hook: park the process mid-write to kill it there
        original(self, batch)
        calls[0] += 1
        if calls[0] == 4:
            Path(sys.argv[2]).write_text("writing")
            time.sleep(60)
    shards.ShardWriter.write_batch = slow_write_batch
    run_ingest(PipelineConfig.model_validate(json.loads(sys.argv[1])))
""")


def test_killed_ingest_leaves_nothing_complete(tmp_path):
    src = _make_docs(tmp_path / "src", 40, 50_000, "k")
    cfg = make_cfg(tmp_path, [files_src(src)], shard_bytes=200_000)
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_dump_json(), str(marker)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the child ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stage_dirs = [d for d in (tmp_path / "wd" / "ingest").iterdir() if d.is_dir()]
        assert len(stage_dirs) == 1
        assert list_shards(stage_dirs[0], "train")  # some shards were already complete
        assert list(stage_dirs[0].rglob(".shard-*.tmp"))  # and one was being written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert read_manifest(stage_dirs[0]) is None
    assert find_complete(tmp_path / "wd", "ingest") == []
    res = run_ingest(cfg)
    assert res["cached"] is False and Path(res["dir"]) == stage_dirs[0]
    verify_shards(res["dir"])
    assert len(all_docs(res)) == 40
    assert not list(Path(res["dir"]).rglob("*.tmp"))


# ------------------------------------------------------------------------------------------ Prefect
def test_ingest_flow_through_prefect(tmp_path, prefect_harness):
    from flows.ingest import ingest_flow

    (tmp_path / "x.txt").write_bytes(b"prefect flow bytes")
    cfg = make_cfg(tmp_path, [files_src(tmp_path / "x.txt")])
    result = ingest_flow(cfg)
    assert result["stage"] == "ingest" and result["summary"]["docs"] == 1
    assert [v[1] for v in all_docs(result).values()] == [b"prefect flow bytes"]
    assert read_manifest(result["dir"], result["key"]) is not None
