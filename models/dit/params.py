"""Diffusion-transformer checkpoints (diffusers layout) → the Flax transformer (PixArt-Σ `PixArtTransformer2DModel`,
SD3/SD3.5 `SD3Transformer2DModel`, FLUX.1 `FluxTransformer2DModel`: one key table and config reader each, `ARCHS`); the VAE encoder is read with
Stable Diffusion's key table (`models.sd.params`).

    transformer/  config.json, diffusion_pytorch_model.safetensors (or shards + its .index.json)
    vae/          config.json, diffusion_pytorch_model.safetensors

Tensors are read with numpy (`convert.read_safetensors`: bf16 widened to float32, fp16 kept, then one explicit cast
to the model's dtype when the state is filled) and mapped through an explicit key table (`convert.Rule`): coverage
is checked both ways (an unmapped tensor, an unfilled parameter, a duplicate, a wrong shape each fail with the
tensor's name). The architecture comes from config.json: the fields the ported models set are read, any option this
port does not implement is refused by name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax.numpy as jnp

from spectral_jax.errors import InputError
from spectral_jax.models import convert as C
from spectral_jax.models.convert import (KeyTable, abstract_model, apply_table, assemble, check_fields,
                                         random_params, read_json)
from spectral_jax.models.dit.config import FluxConfig, PixArtConfig, SD3Config
from spectral_jax.models.dit.flux import FluxTransformer2DModel
from spectral_jax.models.dit.mmdit import SD3Transformer2DModel
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

_A = _B + r"\.attn"
SD3_TABLE = KeyTable((), (
    *C.conv(r"pos_embed\.proj", "pos_embed.proj"),
    *C.param(r"pos_embed\.pos_embed", "pos_embed.pos_embed"),
    *C.linear(r"time_text_embed\.(timestep_embedder|text_embedder)\.(linear_[12])", r"time_text_embed.\1.\2"),
    *C.linear(r"context_embedder", "context_embedder"),
    *C.linear(_B + r"\.(norm1|norm1_context)\.linear", _B_T + r".\2.linear"),
    *C.linear(_A + r"\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)", _B_T + r".attn.\2"),
    *C.param(_A + r"\.(norm_q|norm_k|norm_added_q|norm_added_k)\.weight", _B_T + r".attn.\2.weight"),
    *C.linear(_B + r"\.(ff|ff_context)\.net\.0\.proj", _B_T + r".\2.net.0.proj"),
    *C.linear(_B + r"\.(ff|ff_context)\.net\.2", _B_T + r".\2.net.2"),
    *C.linear(r"norm_out\.linear", "norm_out.linear"),
    *C.linear(r"proj_out", "proj_out")), ())

_S = r"single_transformer_blocks\.(\d+)"
FLUX_TABLE = KeyTable((), (
    *C.linear(r"(x_embedder|context_embedder|proj_out|norm_out\.linear)", r"\1"),
    *C.linear(r"time_text_embed\.(timestep_embedder|guidance_embedder|text_embedder)\.(linear_[12])",
              r"time_text_embed.\1.\2"),
    *C.linear(_B + r"\.(norm1|norm1_context)\.linear", _B_T + r".\2.linear"),
    *C.linear(_A + r"\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)", _B_T + r".attn.\2"),
    *C.param(_A + r"\.(norm_q|norm_k|norm_added_q|norm_added_k)\.weight", _B_T + r".attn.\2.weight"),
    *C.linear(_B + r"\.(ff|ff_context)\.net\.0\.proj", _B_T + r".\2.net.0.proj"),
    *C.linear(_B + r"\.(ff|ff_context)\.net\.2", _B_T + r".\2.net.2"),
    *C.linear(_S + r"\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv])", r"single_transformer_blocks.\1.\2"),
    *C.param(_S + r"\.attn\.(norm_q|norm_k)\.weight", r"single_transformer_blocks.\1.attn.\2.weight")), ())

_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
TRANSFORMER = Component("transformer", PixArtTransformer2DModel, lambda cfg: PIXART_TABLE, _FILES)

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


_SD3_DEFAULTS = dict(num_attention_heads=18, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=18,
                     joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048,
                     sample_size=128, patch_size=2, pos_embed_max_size=96, qk_norm=None)
_SD3_KINDS = dict(num_attention_heads="pos", attention_head_dim="pos", in_channels="pos", out_channels="pos",
                  num_layers="pos", joint_attention_dim="pos", caption_projection_dim="pos",
                  pooled_projection_dim="pos", sample_size="pos", patch_size="pos", pos_embed_max_size="pos",
                  qk_norm="str")


def sd3_config_from_diffusers(d: dict, what: str = "transformer/config.json") -> SD3Config:
    """Our `SD3Config` for a diffusers `SD3Transformer2DModel` config (SD3, SD3.5 Large; not dual attention)."""
    if d.get("dual_attention_layers"):
        raise InputError(what, "uses options this port does not implement: dual_attention_layers (SD3.5 Medium's "
                         "MMDiT-X)", "use an SD3 Medium or SD3.5 Large transformer checkpoint")
    d = {k: v for k, v in d.items() if k in _SD3_DEFAULTS and v is not None}
    check_fields(d, _SD3_KINDS, what, _FIX)
    d = {**_SD3_DEFAULTS, **d}
    d["out_channels"] = d["out_channels"] or d["in_channels"]
    try:
        return SD3Config(**d)
    except ValueError as e:
        raise InputError(what, str(e), "use an SD3 Medium or SD3.5 Large transformer checkpoint") from None


_FLUX_DEFAULTS = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                      pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=[16, 56, 56])
_FLUX_KINDS = dict(patch_size="pos", in_channels="pos", out_channels="pos", num_layers="pos", num_single_layers="nat",
                   attention_head_dim="pos", num_attention_heads="pos", joint_attention_dim="pos",
                   pooled_projection_dim="pos", guidance_embeds="bool", axes_dims_rope="pos_list")


def flux_config_from_diffusers(d: dict, what: str = "transformer/config.json", guidance: float = 3.5) -> FluxConfig:
    """Our `FluxConfig` for a diffusers `FluxTransformer2DModel` config (latent channels = in_channels / 4): its
    config.json, or a model's `.config` (where axes_dims_rope is a tuple; any sequence of ints is taken)."""
    d = {k: v for k, v in d.items() if k in _FLUX_DEFAULTS and v is not None}
    rope = d.get("axes_dims_rope")
    if isinstance(rope, Sequence) and not isinstance(rope, (str, bytes)):
        d["axes_dims_rope"] = list(rope)   # checked as the JSON list it would be
    check_fields(d, _FLUX_KINDS, what, _FIX)
    d = {**_FLUX_DEFAULTS, **d}
    fix = "use a FLUX.1 transformer checkpoint"
    if d["patch_size"] != 1 or d["in_channels"] % 4 or (d["out_channels"] or d["in_channels"]) % 4:
        raise InputError(what, f"patch_size {d['patch_size']}, in_channels {d['in_channels']}: FLUX packs 2×2 latent "
                         "patches into 4× channels with patch_size 1", fix)
    try:
        return FluxConfig(num_attention_heads=d["num_attention_heads"], attention_head_dim=d["attention_head_dim"],
                          in_channels=d["in_channels"] // 4, out_channels=(d["out_channels"] or d["in_channels"]) // 4,
                          num_double_layers=d["num_layers"], num_single_layers=d["num_single_layers"],
                          joint_attention_dim=d["joint_attention_dim"],
                          pooled_projection_dim=d["pooled_projection_dim"], guidance_embeds=d["guidance_embeds"],
                          axes_dims_rope=tuple(d["axes_dims_rope"]), guidance=guidance)
    except ValueError as e:
        raise InputError(what, str(e), fix) from None


@dataclasses.dataclass(frozen=True)
class Arch:
    """One transformer architecture: its config class, Flax module, key table and config.json reader."""

    title: str
    cls: type
    table: KeyTable
    read: object


ARCHS = {PixArtConfig: Arch("PixArt", PixArtTransformer2DModel, PIXART_TABLE, pixart_config_from_diffusers),
         SD3Config: Arch("SD3", SD3Transformer2DModel, SD3_TABLE, sd3_config_from_diffusers),
         FluxConfig: Arch("FLUX", FluxTransformer2DModel, FLUX_TABLE, flux_config_from_diffusers)}
_BY_CLASS = {"SD3Transformer2DModel": sd3_config_from_diffusers, "FluxTransformer2DModel": flux_config_from_diffusers}


def transformer_config(path: str, expected):
    """`path`/config.json as the config of `expected`'s architecture; a different model is refused by field (no
    config.json: `expected`)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return expected
    read = ARCHS[type(expected)].read
    d = read_json(file, _FIX)
    cfg = read(d, file, expected.guidance) if isinstance(expected, FluxConfig) else read(d, file)
    if cfg != expected:
        diff = [f"{f.name}={getattr(cfg, f.name)} (expected {getattr(expected, f.name)})"
                for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expected, f.name)]
        raise InputError(file, f"describes a different model: {', '.join(diff)}",
                         "pass the checkpoint that matches --model, or the --model that matches the checkpoint")
    return cfg


def load_transformer(path: str, expected=None, *, dtype=jnp.float32):
    """The transformer from a diffusers-layout folder (config.json + safetensors, sharded or not). expected: the
    config it must have (its class picks the architecture); None: a PixArt read from config.json."""
    if not os.path.isdir(path):
        raise InputError(path, "no such folder", "pass the transformer/ folder of a diffusers-layout checkpoint")
    if expected is None:
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise InputError(path, "has no config.json", "pass a diffusers-layout transformer folder")
        d = read_json(file, _FIX)
        expected = _BY_CLASS.get(d.get("_class_name"), pixart_config_from_diffusers)(d, file)
    cfg = transformer_config(path, expected)
    arch = ARCHS[type(cfg)]
    tensors = read_component(path, TRANSFORMER)
    params = apply_table(arch.table, abstract_model(arch.cls, cfg)[2], tensors, path,
                         f"pass the transformer folder of a {arch.title} checkpoint in diffusers layout", arch.title)
    return assemble(arch.cls, cfg, params, dtype)


def random_transformer(cfg, seed: int = 0, *, dtype=jnp.float32):
    """A seeded random transformer of `cfg`'s architecture (`convert.random_params`)."""
    cls = ARCHS[type(cfg)].cls
    return assemble(cls, cfg, random_params(cls, cfg, seed), dtype)
