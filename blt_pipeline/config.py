"""Pipeline configuration: one pydantic model per stage, nested in ``PipelineConfig``.

Presets live in ``configs/<name>.yaml``; ``load_config`` reads one (or any YAML path), applies
``--set a.b.c=value`` overrides and validates. Unknown keys and bad values raise ``ConfigError`` naming
the key and the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from blt_model.config import BltConfig, EntropyModelConfig, StrictModel, TransformerShape

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the file."""


# ----------------------------------------------------------------------------------------------- ingest
class SourceConfig(StrictModel):
    """One input of the ingest stage."""

    kind: Literal["default", "files", "hub"] = Field(
        default="files", description="default corpus, local files/dirs/globs, or a HF hub dataset"
    )
    paths: list[str] = Field(default_factory=list, description="files, directories or globs (kind=files)")
    name: str | None = Field(default=None, description="HF hub dataset id (kind=hub)")
    subset: str | None = Field(default=None, description="HF dataset config name (kind=hub)")
    split: str = Field(default="train", description="HF split (kind=hub)")
    text_field: str = Field(default="text", description="field holding the text in jsonl/json/parquet/hub rows")
    id_field: str | None = Field(default=None, description="optional field holding a document id")
    weight: float = Field(default=1.0, gt=0, description="share of data.max_total_bytes taken from this source")
    max_docs: int | None = Field(default=None, gt=0, description="stop after this many documents")
    max_bytes: int | None = Field(default=None, gt=0, description="stop after this many bytes")
    on_bad_record: Literal["error", "skip"] = Field(
        default="error", description="malformed jsonl/json line: fail naming file and line, or skip and count"
    )

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.kind == "files" and not self.paths:
            raise ValueError("kind=files needs at least one entry in `paths`")
        if self.kind == "hub" and not self.name:
            raise ValueError("kind=hub needs `name` (the dataset id)")
        return self


class IngestConfig(StrictModel):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(kind="default")],
        description="inputs; the default corpus (this interpreter's stdlib sources and docs) when empty",
    )
    default_corpus_bytes: int = Field(default=32_000_000, gt=0, description="size cap of the default corpus")
    max_total_bytes: int | None = Field(default=None, gt=0, description="total budget split by source weights")
    val_fraction: float = Field(default=0.02, ge=0, lt=1, description="share of documents in val (hash split)")
    shard_bytes: int = Field(default=64 * 2**20, gt=0, description="target bytes per shard")
    shard_multiple: int = Field(default=1, gt=0, description="shard count is padded to a multiple of this")
    max_doc_bytes: int | None = Field(
        default=None, gt=0, description="split longer documents into parts (None = keep whole)"
    )
    min_doc_bytes: int = Field(default=1, ge=1, description="documents shorter than this are skipped, counted")

    @model_validator(mode="after")
    def _default_when_empty(self) -> IngestConfig:
        # `sources: []` means the default corpus; normalise so both spellings give one stage key.
        if not self.sources:
            object.__setattr__(self, "sources", [SourceConfig(kind="default")])
        return self


# ----------------------------------------------------------------------------------------------- training
class TrainConfig(StrictModel):
    """Optimisation and Lightning trainer settings shared by both training stages."""

    max_steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=8, gt=0, description="rows per device per step")
    seq_len: int = Field(default=1024, gt=1, description="bytes per row (entropy) / patches per row (BLT)")
    max_bytes_per_row: int | None = Field(
        default=None, gt=1, description="BLT: cap on bytes per row (None = seq_len * 8)"
    )
    lr: float = Field(default=4e-4, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(default=1.0, gt=0)
    val_every_n_steps: int = Field(default=200, gt=0)
    val_batches: int = Field(default=8, gt=0)
    ckpt_every_n_steps: int = Field(default=200, gt=0)
    log_every_n_steps: int = Field(default=10, gt=0)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = Field(default=1, gt=0)
    num_nodes: int = Field(default=1, gt=0)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        default="auto", description="auto = fp32 on CPU, bf16-mixed on GPU"
    )
    compile: bool = Field(default=False, description="torch.compile the model (GPU only pays)")
    num_workers: int = Field(default=0, ge=0, description="DataLoader workers")
    seed: int = 0


class EntropyStageConfig(StrictModel):
    model: EntropyModelConfig = Field(default_factory=EntropyModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class PatchConfig(StrictModel):
    mode: Literal["entropy", "space", "static", "byte"] = "entropy"
    threshold: float | None = Field(default=None, description="entropy threshold θ; None = calibrate")
    target_bytes_per_patch: float = Field(default=4.5, gt=1, description="calibration target")
    monotonic: bool = Field(default=False, description="approximate monotonic rule: H[t-1]-H[t-2] > θ")
    threshold_add: float | None = Field(default=None, description="global + relative rule")
    max_patch_length: int | None = Field(default=None, gt=0)
    static_size: int = Field(default=4, gt=0, description="patch size of mode=static")
    calibration_docs: int = Field(default=256, gt=0, description="val/train docs sampled for calibration")
    chunk_len: int = Field(default=8192, gt=0, description="tokens per entropy-model call; longer docs continue through its rolling KV cache")
    batch_size: int = Field(default=8, gt=0)
    num_workers: int = Field(default=1, ge=1, description="processes computing entropies")


class BltStageConfig(StrictModel):
    model: BltConfig = Field(default_factory=BltConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class EvalConfig(StrictModel):
    baseline: bool = Field(default=True, description="train and score a byte-level baseline at equal FLOPs")
    baseline_model: TransformerShape = TransformerShape(dim=384, n_layers=6, n_heads=6, ffn_dim=1024)
    max_val_bytes: int = Field(default=2_000_000, gt=0, description="val bytes scored")
    samples: int = Field(default=3, ge=0, description="val documents shown as patch pictures")
    generate_bytes: int = Field(default=128, ge=0)
    prompt: str = "def "


class WandbConfig(StrictModel):
    project: str = "blt-pipeline"
    entity: str | None = None
    group: str | None = Field(default=None, description="W&B group; None = the pipeline run name")
    mode: Literal["offline", "online", "disabled"] | None = Field(
        default=None, description="None = WANDB_MODE from the environment, else offline"
    )
    log_model: bool = Field(default=False, description="upload checkpoints as model artifacts (online only)")


class PipelineConfig(StrictModel):
    """The whole DAG: ingest -> train_entropy -> patch -> train_blt -> evaluate."""

    name: str = Field(default="blt", description="run name; also the default W&B group")
    workdir: str = Field(default="runs", description="root of every stage directory")
    seed: int = 0
    data: IngestConfig = Field(default_factory=IngestConfig)
    entropy: EntropyStageConfig = Field(default_factory=EntropyStageConfig)
    patch: PatchConfig = Field(default_factory=PatchConfig)
    blt: BltStageConfig = Field(default_factory=BltStageConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    def to_json_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(by_alias=True))


# ----------------------------------------------------------------------------------------------- loading
def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{name_or_path}.yaml"


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override `{dotted}`: `{k}` is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` with the value parsed as YAML (numbers, lists, null, booleans)."""
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override `{item}` has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  - `{loc}`: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden"
                     else f"  - `{loc}`: {msg}")
    return "\n".join(lines)


def config_from_dict(tree: dict, origin: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(preset: str | Path = "tiny", overrides: list[str] | None = None,
                workdir: str | None = None) -> PipelineConfig:
    """Load a preset name or YAML path, apply ``key=value`` overrides, validate."""
    path = preset_path(preset)
    if not path.exists():
        raise ConfigError(f"no such preset or config file: {preset} (presets: {', '.join(list_presets())})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    origin = str(path)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
        origin = f"{path} (with overrides {', '.join(overrides or [])})"
    if workdir is not None:
        tree["workdir"] = workdir
    return config_from_dict(tree, origin)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json(by_alias=True)), sort_keys=False)


__all__ = [
    "BltConfig", "BltStageConfig", "ConfigError", "EntropyModelConfig", "EntropyStageConfig", "EvalConfig",
    "IngestConfig", "PatchConfig", "PipelineConfig", "SourceConfig", "TrainConfig", "TransformerShape",
    "WandbConfig", "config_from_dict", "load_config", "parse_override", "preset_path", "list_presets",
]

