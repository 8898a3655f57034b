"""Model configurations (pydantic, ``extra="forbid"``): the entropy model and the BLT.

Field names follow the official code's meaning (see ``shared/docs/BLT_REFERENCE.md`` §1.11) with one
sub-config per transformer. Defaults are the released BLT-1B shape; the ``tiny`` CPU shape used by the
benchmarks is ``BltConfig.reference_tiny()`` (from ``shared/bench/blt_cpu_reference.json``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

VOCAB_SIZE = 260


def swiglu_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float = 1.0) -> int:
    """FFN width rule of the official code: int(2*4d/3)*mult rounded up to ``multiple_of``."""
    hidden = int(ffn_dim_multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TransformerShape(StrictModel):
    """One stack of pre-norm transformer blocks (SwiGLU FFN, no biases, RMSNorm)."""

    dim: int = Field(gt=0, description="hidden width")
    n_layers: int = Field(ge=0, description="number of transformer blocks")
    n_heads: int = Field(gt=0, description="attention heads")
    n_kv_heads: int | None = Field(default=None, description="key/value heads (GQA); None = n_heads")
    ffn_dim: int | None = Field(default=None, description="SwiGLU hidden width; None = official rounding rule")

    @model_validator(mode="after")
    def _check(self) -> TransformerShape:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim if self.ffn_dim is not None else swiglu_hidden(self.dim)


class EntropyModelConfig(StrictModel):
    """Small causal byte LM whose next-byte entropy drives patching (released: 14 x 768, window 512)."""

    vocab_size: int = VOCAB_SIZE
    shape: TransformerShape = TransformerShape(dim=768, n_layers=14, n_heads=12, ffn_dim=2048)
    window: int = Field(default=512, gt=0, description="sliding attention window in bytes (train = inference)")
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = 1e-5
    max_seqlen: int = Field(default=8192, gt=0, description="longest row the model is run on")


class BltConfig(StrictModel):
    """Byte Latent Transformer: local encoder -> latent global transformer -> local decoder."""

    vocab_size: int = VOCAB_SIZE
    encoder: TransformerShape = TransformerShape(dim=1024, n_layers=1, n_heads=16, ffn_dim=2816)
    global_: TransformerShape = Field(
        default=TransformerShape(dim=2048, n_layers=25, n_heads=16, ffn_dim=5632), alias="global"
    )
    decoder: TransformerShape = TransformerShape(dim=1024, n_layers=9, n_heads=16, ffn_dim=2816)
    cross_attn_k: int = Field(default=2, gt=0, description="slots of width h_E per patch (k = h_G / h_E)")
    cross_attn_all_layers_encoder: bool = False
    cross_attn_all_layers_decoder: bool = True
    hash_sizes: list[int] = Field(default=[3, 4, 5, 6, 7, 8], description="n-gram sizes hashed")
    hash_vocab: int = Field(default=500002, gt=0, description="rows per hash table")
    hash_functions: int = Field(default=1, ge=0, le=11, description="hash functions per n-gram size")
    window: int = Field(default=512, gt=0, description="local encoder/decoder sliding window (bytes)")
    rope_theta: float = Field(default=500000.0, gt=0)
    norm_eps: float = 1e-5
    max_seqlen: int = Field(default=24576, gt=0, description="longest byte row")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> BltConfig:
        if self.encoder.dim != self.decoder.dim:
            raise ValueError(
                f"encoder.dim={self.encoder.dim} must equal decoder.dim={self.decoder.dim} "
                "(the decoder starts from the encoder's byte states)"
            )
        if any(n < 1 for n in self.hash_sizes):
            raise ValueError(f"hash_sizes must be >= 1, got {self.hash_sizes}")
        return self

    @property
    def global_input_projection(self) -> bool:
        """True when k*h_E != h_G, so patch vectors need a projection into the global width."""
        return self.cross_attn_k * self.encoder.dim != self.global_.dim

    @classmethod
    def reference_tiny(cls) -> BltConfig:
        """The CPU benchmark shape of ``shared/bench/blt_cpu_reference.json``."""
        return cls(
            encoder=TransformerShape(dim=256, n_layers=1, n_heads=4, ffn_dim=768),
            global_=TransformerShape(dim=512, n_layers=6, n_heads=8, ffn_dim=1536),
            decoder=TransformerShape(dim=256, n_layers=4, n_heads=4, ffn_dim=768),
            cross_attn_k=2,
            hash_vocab=4096,
            window=512,
            max_seqlen=8192,
        )


def reference_tiny_entropy() -> EntropyModelConfig:
    """Patcher shape of ``shared/bench/blt_cpu_reference.json``."""
    return EntropyModelConfig(shape=TransformerShape(dim=256, n_layers=4, n_heads=4, ffn_dim=768), window=512)
