"""Configuration: presets load, bad keys/values fail naming key and file, overrides apply."""

from __future__ import annotations

import pytest

from blt_model.config import BltConfig, TransformerShape, swiglu_hidden
from blt_pipeline.cli import main as cli_main
from blt_pipeline.config import (
    CONFIG_DIR,
    ConfigError,
    PipelineConfig,
    list_presets,
    load_config,
    parse_override,
)


def test_every_preset_loads():
    presets = list_presets()
    assert {"tiny", "small", "blt-1b"} <= set(presets)
    for name in presets:
        cfg = load_config(name)
        assert isinstance(cfg, PipelineConfig)
        assert cfg.name == name


def test_blt1b_preset_is_the_released_shape():
    m = load_config("blt-1b").blt.model
    assert (m.encoder.dim, m.encoder.n_layers, m.global_.dim, m.global_.n_layers) == (1024, 1, 2048, 25)
    assert (m.decoder.n_layers, m.cross_attn_k, m.hash_vocab) == (9, 2, 500002)
    assert not m.global_input_projection
    assert load_config("blt-1b").patch.threshold == pytest.approx(1.335442066192627)


def test_overrides_apply_and_parse_types():
    cfg = load_config("tiny", ["data.shard_bytes=12345", "blt.model.hash_sizes=[3,4]", "patch.threshold=null",
                               "blt.train.precision=32-true"])
    assert cfg.data.shard_bytes == 12345
    assert cfg.blt.model.hash_sizes == [3, 4]
    assert cfg.patch.threshold is None
    assert cfg.blt.train.precision == "32-true"
    assert parse_override("a.b=1.5") == ("a.b", 1.5)


def test_unknown_key_names_key_and_file():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["data.shard_byts=1"])
    msg = str(e.value)
    assert "data.shard_byts" in msg and "unknown key" in msg and "tiny.yaml" in msg


def test_bad_value_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "tiny.yaml").read_text().replace("shard_bytes: 1000000", "shard_bytes: -5"))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "data.shard_bytes" in str(e.value) and str(bad) in str(e.value)


def test_inconsistent_model_config_rejected():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["blt.model.decoder.dim=96"])
    assert "decoder.dim" in str(e.value)
    with pytest.raises(ValueError):
        TransformerShape(dim=100, n_layers=1, n_heads=3)


def test_missing_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        load_config("nope")
    assert "tiny" in str(e.value)


def test_swiglu_rule_matches_reference():
    assert [swiglu_hidden(d) for d in (1024, 2048, 768)] == [2816, 5632, 2048]
    assert BltConfig().global_.hidden_dim == 5632


def test_cli_config_error_is_one_line(capsys):
    rc = cli_main(["config", "--set", "nonsense.key=1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: invalid configuration") and "Traceback" not in err


def test_cli_prints_resolved_config(capsys):
    assert cli_main(["config", "--preset", "tiny", "--set", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and "global:" in out


def test_cli_missing_checkpoint_is_one_line(capsys, tmp_path):
    rc = cli_main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "missing" in err and "Traceback" not in err
