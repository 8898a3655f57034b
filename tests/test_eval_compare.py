"""`blt compare`: two runs in one PNG plus a table that names both."""

from __future__ import annotations

import json

from evaluation.compare import compare, load_curve


def _write_run(d, stage, key, bpbs, bytes_per_step=1000):
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "key": key, "complete": True}))
    rows = []
    for i, v in enumerate(bpbs, 1):
        rows.append({"step": i * 10, "train/bytes_seen": i * 10 * bytes_per_step, "train/loss": v * 0.69})
        rows.append({"step": i * 10, "val/bpb": v})  # val rows may lack bytes_seen
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")


def test_compare_two_runs(tmp_path):
    _write_run(tmp_path / "runs" / "train_blt" / "aaaa", "train_blt", "aaaa1111bbbb", [3.0, 2.5, 2.2])
    _write_run(tmp_path / "runs" / "baseline" / "cccc", "baseline", "cccc2222dddd", [3.2, 2.9], 2000)
    out = tmp_path / "cmp.png"
    png, table = compare([tmp_path / "runs" / "train_blt" / "aaaa", tmp_path / "runs" / "baseline"], out)
    assert png == out and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "train_blt/aaaa1111" in table and "baseline/cccc2222" in table
    assert "2.2000" in table and "2.9000" in table
    assert (tmp_path / "cmp.md").read_text().count("|") > 10


def test_val_rows_take_bytes_seen_of_latest_row(tmp_path):
    _write_run(tmp_path / "r", "train_blt", "k" * 16, [3.0, 2.0])
    c = load_curve(tmp_path / "r" / "metrics.jsonl")
    assert c.bytes_seen == [10_000.0, 20_000.0] and c.val_bpb == [3.0, 2.0] and c.last_step == 20
