"""training.artifacts: model.pt round trips for ByteLM and BLT; clear errors for missing or corrupt files."""

from __future__ import annotations

import pytest
import torch

from blt_model.config import BltConfig, EntropyModelConfig, TransformerShape
from training.artifacts import ModelFileError, build_model, load_model, save_model

SMALL = TransformerShape(dim=32, n_layers=1, n_heads=2, ffn_dim=64)


def _blt_cfg() -> BltConfig:
    return BltConfig(encoder=SMALL, global_=TransformerShape(dim=64, n_layers=1, n_heads=2, ffn_dim=128),
                     decoder=SMALL, hash_vocab=64, window=16, max_seqlen=128)


@pytest.mark.parametrize("kind", ["entropy", "baseline", "blt"])
def test_round_trip(tmp_path, kind):
    cfg = _blt_cfg() if kind == "blt" else EntropyModelConfig(shape=SMALL, window=16, max_seqlen=128)
    torch.manual_seed(0)
    model = build_model(kind, cfg)
    save_model(tmp_path, model, kind, cfg)  # a directory: writes model.pt inside
    loaded, loaded_cfg, loaded_kind = load_model(tmp_path)
    assert loaded_kind == kind and loaded_cfg == cfg and not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randint(4, 260, (1, 12))
    args = (x, torch.tensor([[1, 4, 8]])) if kind == "blt" else (x,)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(*args), loaded(*args), rtol=0, atol=0)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelFileError, match="missing"):
        load_model(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a zip file")
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(tmp_path / "model.pt")
    torch.save({"weights": {}}, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="kind/config/state_dict"):
        load_model(tmp_path)
    cfg = EntropyModelConfig(shape=SMALL, window=16, max_seqlen=128)
    model = build_model("entropy", cfg)
    bigger = cfg.model_copy(update={"shape": TransformerShape(dim=64, n_layers=1, n_heads=2, ffn_dim=64)})
    save_model(tmp_path / "model.pt", model, "entropy", bigger)
    with pytest.raises(ModelFileError, match="does not match"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        save_model(tmp_path / "x.pt", model, "gpt", cfg)
