"""Diffusion-transformer checkpoints (diffusers layout) → the Flax transformer; the VAE encoder is read by Stable
Diffusion's loader (`models.sd.params.load_vae`).

    transformer/  config.json, diffusion_pytorch_model.safetensors (or shards + its .index.json)
    vae/          config.json, diffusion_pytorch_model.safetensors

Tensors are read with numpy (`convert.read_safetensors`: bf16 widened to float32, fp16 kept, then one explicit cast
to the model's dtype when the state is filled) and mapped through an explicit key table (`convert.Rule`): coverage
is checked both ways (an unmapped tensor, an unfilled parameter, a duplicate, a wrong shape each fail with the
tensor's name). The architecture comes from config.json: the fields PixArt-Σ sets are read, any option this port
does not implement is refused by name.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from spectral_jax.errors import InputError
from spectral_jax.models import convert as C
from spectral_jax.models.convert import KeyTable, abstract_model, apply_table, assemble, check_fields, read_json
from spectral_jax.models.dit.config import PixArtConfig
from spectral_jax.models.dit.pixart import PixArtTransformer2DModel
from spectral_jax.models.sd.params import Component, read_component

_B = r"transformer_blocks\.(\d+)"
_B_T = r"transformer_blocks.\1"

PIXART_TABLE = KeyTable((), (
    *C.conv(r"pos_embed\.proj", "pos_embed.proj"),
    *C.linear(r"adaln_single\.emb\.timestep_embedder\.(linear_[12])", r"adaln_single.emb.timestep_embedder.\1"),
    *C.linear(r"adaln_single\.linear", "adaln_single.linear"),
    *C.linear(r"caption_projection\.(linear_[12])", r"caption_projection.\1"),
    *C.param(_B + r"\.scale_shift_table", _B_T + ".scale_shift_table"),
    *C.linear(_B + r"\.(attn[12])\.(to_[qkv]|to_out\.0)", _B_T + r".\2.\3"),
    *C.linear(_B + r"\.ff\.net\.0\.proj", _B_T + ".ff.net.0.proj"),
    *C.linear(_B + r"\.ff\.net\.2", _B_T + ".ff.net.2"),
    *C.param(r"scale_shift_table", "scale_shift_table"),
    *C.linear(r"proj_out", "proj_out")), (
    (r"pos_embed\.pos_embed", "the sin-cos position table: recomputed for every grid, as diffusers does"),))

TRANSFORMER = Component("transformer", PixArtTransformer2DModel, lambda cfg: PIXART_TABLE,
                        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"))

# diffusers `PixArtTransformer2DModel.__init__` defaults of the fields read here.
_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                 cross_attention_dim=1152, caption_channels=None, sample_size=128, patch_size=2,
                 interpolation_scale=None, norm_eps=1e-6)
_KINDS = dict(num_attention_heads="pos", attention_head_dim="pos", in_channels="pos", out_channels="pos",
              num_layers="pos", cross_attention_dim="pos", caption_channels="pos", sample_size="pos",
              patch_size="pos", interpolation_scale="pos_num", norm_eps="pos_num")
# Options PixArt-Σ leaves at these values; anything else is a different architecture, refused by name.
_FIXED = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_bias=True,
              upcast_attention=False, norm_elementwise_affine=False, attention_type="default")
_FIX = "fix or re-download the checkpoint's transformer/config.json"


def pixart_config_from_diffusers(d: dict, what: str = "transformer/config.json") -> PixArtConfig:
    """Our `PixArtConfig` for a diffusers `PixArtTransformer2DModel` (or PixArt `Transformer2DModel`) config."""
    bad = [f"{k}={d[k]!r}" for k, v in _FIXED.items() if k in d and d[k] != v]
    extra = d.get("use_additional_conditions")
    if extra is None and d.get("sample_size", _DEFAULTS["sample_size"]) == 128:
        extra = True  # diffusers' default at 1024² (PixArt-α); PixArt-Σ configs set it to false
    if extra:
        bad.append("use_additional_conditions=true (PixArt-α's resolution/aspect-ratio embedding)")
    if bad:
        raise InputError(what, f"uses options this port does not implement: {', '.join(bad)}",
                         "use a PixArt-Σ transformer checkpoint")
    d = {k: v for k, v in d.items() if k in _DEFAULTS and v is not None}
    check_fields(d, _KINDS, what, _FIX)
    d = {**_DEFAULTS, **d}
    d["out_channels"] = d["out_channels"] or d["in_channels"]
    try:
        return PixArtConfig(**{k: d[k] for k in _DEFAULTS})
    except ValueError as e:
        raise InputError(what, str(e), "use a PixArt-Σ transformer checkpoint") from None


def transformer_config(path: str, expected: PixArtConfig | None = None) -> PixArtConfig:
    """`path`/config.json as a `PixArtConfig`; with `expected`, a different architecture is refused by field (no
    config.json: `expected`)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        if expected is None:
            raise InputError(path, "has no config.json", "pass a diffusers-layout transformer folder")
        return expected
    cfg = pixart_config_from_diffusers(read_json(file, _FIX), file)
    if expected is not None and cfg != expected:
        diff = [f"{f.name}={getattr(cfg, f.name)} (expected {getattr(expected, f.name)})"
                for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expected, f.name)]
        raise InputError(file, f"describes a different model: {', '.join(diff)}",
                         "pass the checkpoint that matches --model, or the --model that matches the checkpoint")
    return cfg


def load_transformer(path: str, expected: PixArtConfig | None = None, *, dtype=jnp.float32):
    """The transformer from a diffusers-layout folder (config.json + safetensors, sharded or not)."""
    if not os.path.isdir(path):
        raise InputError(path, "no such folder", "pass the transformer/ folder of a diffusers-layout checkpoint")
    cfg = transformer_config(path, expected)
    tensors = read_component(path, TRANSFORMER)
    params = apply_table(PIXART_TABLE, abstract_model(PixArtTransformer2DModel, cfg)[2], tensors, path,
                         "pass the transformer folder of a PixArt-Σ checkpoint in diffusers layout", "PixArt")
    return assemble(PixArtTransformer2DModel, cfg, params, dtype)
