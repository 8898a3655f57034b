"""Saved models: one file ``model.pt`` per training stage, ``{"kind", "config", "state_dict"}``.

``kind`` is ``"entropy"`` or ``"baseline"`` (both a ``blt_model.entropy_model.ByteLM`` built from an
``EntropyModelConfig``) or ``"blt"`` (``blt_model.model.BLT`` from a ``BltConfig``). ``config`` is the
model config as a JSON dict, so the file loads without pickled classes (``torch.load(weights_only=True)``).
Writes are atomic (temporary file + rename): a ``model.pt`` either is complete or does not exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from blt_pipeline.stage import atomic_path

MODEL_FILE = "model.pt"
KINDS = ("entropy", "baseline", "blt")


class ModelFileError(ValueError):
    """``model.pt`` is missing, truncated, or not a model file of this project (the message names it)."""


def _config_class(kind: str):
    from blt_model.config import BltConfig, EntropyModelConfig

    if kind in ("entropy", "baseline"):
        return EntropyModelConfig
    if kind == "blt":
        return BltConfig
    raise ValueError(f"unknown model kind {kind!r} (expected one of {KINDS})")


def config_to_dict(config: Any) -> dict:
    if isinstance(config, BaseModel):
        return json.loads(config.model_dump_json(by_alias=True))
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    raise TypeError(f"config must be a pydantic model or a dict, got {type(config).__name__}")


def build_model(kind: str, config: Any) -> torch.nn.Module:
    """A freshly initialised model of ``kind`` from a config object or its JSON dict."""
    cls = _config_class(kind)
    cfg = config if isinstance(config, cls) else cls.model_validate(config_to_dict(config))
    if kind == "blt":
        from blt_model.model import BLT

        return BLT(cfg)
    from blt_model.entropy_model import ByteLM

    return ByteLM(cfg)


def _plain_state_dict(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    sd = model if isinstance(model, dict) else model.state_dict()
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("_orig_mod.")  # torch.compile wrapper
        out[k] = v.detach().to("cpu").clone() if isinstance(v, torch.Tensor) else v
    return out


def save_model(path: str | Path, model: torch.nn.Module | dict, kind: str, config: Any) -> Path:
    """Write ``{"kind", "config", "state_dict"}`` atomically to ``path`` (a file, or a stage dir)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} (expected one of {KINDS})")
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    payload = {"kind": kind, "config": config_to_dict(config), "state_dict": _plain_state_dict(model)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_model_file(path_or_stage_dir: str | Path) -> dict:
    """The raw payload of a model file, validated; raises ``ModelFileError`` naming the file."""
    path = Path(path_or_stage_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise ModelFileError(f"model file {path} is missing (did the training stage finish?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage, pickled classes
        raise ModelFileError(f"model file {path} is corrupt or not a model file: {err}") from None
    if not isinstance(payload, dict) or not {"kind", "config", "state_dict"} <= set(payload):
        raise ModelFileError(f"model file {path} lacks kind/config/state_dict")
    if payload["kind"] not in KINDS:
        raise ModelFileError(f"model file {path} has unknown kind {payload['kind']!r}")
    payload["path"] = str(path)
    return payload


def load_model(path_or_stage_dir: str | Path, map_location: str | torch.device = "cpu"):
    """``(model, config, kind)``: the model (eval mode) rebuilt from its config with the saved weights."""
    payload = read_model_file(path_or_stage_dir)
    kind = payload["kind"]
    config = _config_class(kind).model_validate(payload["config"])
    model = build_model(kind, config)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"model file {payload['path']} does not match its config: {err}") from None
    model.to(map_location)
    model.eval()
    return model, config, kind


__all__ = ["KINDS", "MODEL_FILE", "ModelFileError", "build_model", "config_to_dict", "load_model",
           "read_model_file", "save_model"]
