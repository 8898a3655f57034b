"""Conversion between our models and transformers' ``BltForCausalLM`` (5.24).

Mapping (one to one, identical tensors):

* ``BltForCausalLM.model.<name>``  <->  ``BLT.<name>`` for ``local_encoder.*``, ``global_transformer.*``,
  ``local_decoder.*``, ``encoder_hash_tok_embedding.weight`` (fused hash tables, table j at rows
  ``j*hash_vocab``); ``lm_head.weight`` <-> ``BLT.lm_head.weight``.
* ``BltForCausalLM.model.patcher.<name>``  <->  ``ByteLM.<name>`` (``layers.*``, ``embed_tokens``, ``norm``,
  ``lm_head``).

Config: ``BltConfig.encoder/global_/decoder`` <-> ``encoder_config/global_config/decoder_config``
(``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``); ``window`` <-> ``local_attention_window_len``; ``rope_theta`` <-> the sub-configs'
``rope_parameters["rope_theta"]`` (must agree across encoder/global/decoder); hash fields <->
``encoder_hash_byte_group_*``; entropy ``window`` <-> ``patcher_config.sliding_window``.
transformers is imported lazily (only these functions need it).
"""

from __future__ import annotations

import torch

from .config import BltConfig, EntropyModelConfig, TransformerShape
from .entropy_model import ByteLM
from .model import BLT


def _theta(sub) -> float:
    rp = getattr(sub, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", getattr(sub, "rope_theta", 10000.0)))


def _shape(sub) -> TransformerShape:
    kv = sub.num_key_value_heads
    return TransformerShape(
        dim=sub.hidden_size,
        n_layers=sub.num_hidden_layers,
        n_heads=sub.num_attention_heads,
        n_kv_heads=None if kv in (None, sub.num_attention_heads) else kv,
        ffn_dim=sub.intermediate_size,
    )


def configs_from_hf(hf_config) -> tuple[BltConfig, EntropyModelConfig | None]:
    """Our ``(BltConfig, EntropyModelConfig | None)`` from a transformers ``BltConfig``."""
    c = hf_config
    enc, dec, glo = c.encoder_config, c.decoder_config, c.global_config
    thetas = {_theta(enc), _theta(dec), _theta(glo)}
    if len(thetas) != 1:
        raise ValueError(f"encoder/global/decoder rope_theta differ: {thetas}; our BltConfig has one rope_theta")
    eps = {enc.rms_norm_eps, dec.rms_norm_eps, glo.rms_norm_eps}
    if len(eps) != 1:
        raise ValueError(f"rms_norm_eps differ across sub-models: {eps}")
    max_seqlen = enc.max_position_embeddings
    window = c.local_attention_window_len if c.local_attention_window_len is not None else max_seqlen
    blt_cfg = BltConfig(
        vocab_size=c.vocab_size,
        encoder=_shape(enc),
        global_=_shape(glo),
        decoder=_shape(dec),
        cross_attn_k=c.cross_attn_k,
        cross_attn_all_layers_encoder=bool(enc.cross_attn_all_layers),
        cross_attn_all_layers_decoder=bool(dec.cross_attn_all_layers),
        hash_sizes=list(c.encoder_hash_byte_group_size),
        hash_vocab=c.encoder_hash_byte_group_vocab,
        hash_functions=c.encoder_hash_byte_group_nb_functions,
        window=window,
        rope_theta=thetas.pop(),
        norm_eps=eps.pop(),
        max_seqlen=max_seqlen,
    )
    ent_cfg = None
    p = getattr(c, "patcher_config", None)
    if p is not None and getattr(c, "patch_in_forward", True):
        pmax = p.max_position_embeddings
        ent_cfg = EntropyModelConfig(
            vocab_size=p.vocab_size,
            shape=_shape(p),
            window=p.sliding_window if p.sliding_window is not None else pmax,
            rope_theta=_theta(p),
            norm_eps=p.rms_norm_eps,
            max_seqlen=pmax,
        )
    return blt_cfg, ent_cfg


def _sub_kwargs(s: TransformerShape, theta: float, eps: float, max_pos: int) -> dict:
    return dict(
        hidden_size=s.dim,
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.hidden_dim,
        rms_norm_eps=eps,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )


def hf_config_from(blt_cfg: BltConfig, ent_cfg: EntropyModelConfig | None, **extra):
    """A transformers ``BltConfig`` for our configs (``extra`` overrides top-level kwargs, e.g. threshold)."""
    from transformers import BltConfig as HFBltConfig

    b = blt_cfg
    enc = _sub_kwargs(b.encoder, b.rope_theta, b.norm_eps, b.max_seqlen)
    enc.update(cross_attn_all_layers=b.cross_attn_all_layers_encoder, hidden_size_global=b.global_.dim,
               cross_attn_k=b.cross_attn_k)
    dec = _sub_kwargs(b.decoder, b.rope_theta, b.norm_eps, b.max_seqlen)
    dec.update(cross_attn_all_layers=b.cross_attn_all_layers_decoder, hidden_size_global=b.global_.dim,
               cross_attn_k=b.cross_attn_k)
    glo = _sub_kwargs(b.global_, b.rope_theta, b.norm_eps, b.max_seqlen)
    kwargs = dict(
        vocab_size=b.vocab_size,
        max_position_embeddings=b.max_seqlen,
        local_attention_window_len=b.window,
        cross_attn_k=b.cross_attn_k,
        encoder_hash_byte_group_size=list(b.hash_sizes),
        encoder_hash_byte_group_vocab=b.hash_vocab,
        encoder_hash_byte_group_nb_functions=b.hash_functions,
        encoder_config=enc,
        decoder_config=dec,
        global_config=glo,
        rope_parameters={"rope_type": "default", "rope_theta": b.rope_theta},
        tie_word_embeddings=False,
        use_cache=False,
        patch_in_forward=ent_cfg is not None,
    )
    if ent_cfg is not None:
        pk = _sub_kwargs(ent_cfg.shape, ent_cfg.rope_theta, ent_cfg.norm_eps, ent_cfg.max_seqlen)
        pk.update(vocab_size=ent_cfg.vocab_size, sliding_window=ent_cfg.window)
        kwargs["patcher_config"] = pk
    kwargs.update(extra)
    return HFBltConfig(**kwargs)


def blt_state_from_hf(hf_state: dict) -> tuple[dict, dict]:
    """Split a ``BltForCausalLM`` state dict into ``(blt_state, patcher_state)`` (pure renaming)."""
    blt, ent = {}, {}
    for k, v in hf_state.items():
        if k.startswith("model.patcher."):
            ent[k[len("model.patcher."):]] = v
        elif k.startswith("model."):
            blt[k[len("model."):]] = v
        elif k == "lm_head.weight":
            blt[k] = v
        else:
            raise KeyError(f"unexpected transformers key {k!r}")
    return blt, ent


def hf_state_from(blt: BLT, entropy_model: ByteLM | None) -> dict:
    out = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in blt.state_dict().items()}
    if entropy_model is not None:
        out.update({f"model.patcher.{k}": v for k, v in entropy_model.state_dict().items()})
    return out


@torch.no_grad()
def from_hf(hf_model) -> tuple[BLT, ByteLM | None]:
    """``(BLT, ByteLM | None)`` with the config and weights of a transformers ``BltForCausalLM``.

    The entropy model is None when the HF model has no patcher (``patch_in_forward=False``). Weights are
    copied (no sharing); both models are returned in eval mode with the HF model's dtype and device.
    """
    blt_cfg, ent_cfg = configs_from_hf(hf_model.config)
    blt_state, ent_state = blt_state_from_hf(hf_model.state_dict())
    with torch.device("meta"):  # no random init: every tensor comes from the HF model
        blt = BLT(blt_cfg)
        ent = ByteLM(ent_cfg) if ent_cfg is not None else None
    blt.load_state_dict({k: v.detach().clone() for k, v in blt_state.items()}, strict=True, assign=True)
    if ent is not None:
        ent.load_state_dict({k: v.detach().clone() for k, v in ent_state.items()}, strict=True, assign=True)
        ent.eval()
    return blt.eval(), ent


@torch.no_grad()
def to_hf(blt: BLT, entropy_model: ByteLM | None = None, **config_overrides):
    """A transformers ``BltForCausalLM`` with our configs and weights (patcher = ``entropy_model``)."""
    from transformers import BltForCausalLM

    cfg = hf_config_from(blt.cfg, entropy_model.cfg if entropy_model is not None else None, **config_overrides)
    cfg._attn_implementation = "sdpa"
    ref = next(blt.parameters())
    hf = BltForCausalLM(cfg).to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_from(blt, entropy_model), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    return hf.eval()


__all__ = ["from_hf", "to_hf", "configs_from_hf", "hf_config_from", "blt_state_from_hf", "hf_state_from"]
