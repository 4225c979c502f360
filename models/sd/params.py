"""Stable Diffusion checkpoints (diffusers layout) → the Flax UNet, VAE encoder and CLIP text encoder.

A diffusers pipeline directory (or HF snapshot) holds one subfolder per component:
    unet/          config.json, diffusion_pytorch_model.safetensors      → `UNet2DConditionModel`
    vae/           config.json, diffusion_pytorch_model.safetensors      → `AutoencoderKL` (encoder half)
    text_encoder/  config.json, model.safetensors                        → `CLIPTextModel`
Tensors are read with numpy (`convert.read_safetensors`; fp16/bf16 variants are widened) and mapped through one
explicit key table per component (`convert.Rule`: source-key regex → target parameter path + transform: Linear
`[out, in]` → kernel `[in, out]`; Conv `[O, I, kh, kw]` → `[kh, kw, I, O]`; norm weight → scale). Conversion fails,
naming the tensors, on a source key no rule maps, on a parameter no tensor fills, on a duplicate, and on any
shape mismatch. Deliberately unused source keys are listed with the reason (the VAE decoder, CLIP's position_ids
buffer). Old diffusers VAE attention names (query/key/value/proj_attn) are accepted beside the new ones
(to_q/to_k/to_v/to_out.0), as diffusers itself does on load.

Each component's architecture comes from its config.json (the fields SD 1.x/2.x use; any other non-default option
is refused by name) or, without one, from the caller's expected config.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.models import convert as C
from spectral_jax.models.convert import (KeyTable, Rule, abstract_model, apply_table, assemble, check_fields,
                                         random_params, read_json, read_safetensors, shards_from_index)
from spectral_jax.models.sd.clip_text import CLIPTextModel
from spectral_jax.models.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
from spectral_jax.models.sd.unet import UNet2DConditionModel
from spectral_jax.models.sd.vae import AutoencoderKL

# ---------------------------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------------------------

_BLK = r"((?:down|up)_blocks\.\d+|mid_block)"
_RES = _BLK + r"\.resnets\.(\d+)"
_ATT = _BLK + r"\.attentions\.(\d+)"
_TB = _ATT + r"\.transformer_blocks\.(\d+)"
_TB_T = r"\1.attentions.\2.transformer_blocks.\3"


def _linear_w(src, tgt):  # bias-free Linear (to_q/to_k/to_v in the UNet)
    return [Rule(src + r"\.weight", (tgt + ".kernel",), C.linear_t)]


def _embedding(src, tgt):
    return [Rule(src + r"\.weight", (tgt + ".embedding",), C.same)]


def _linear_or_1x1(a):
    """Linear `[out, in]`, or a 1×1 conv `[out, in, 1, 1]` (VAE attention in some converted checkpoints) →
    kernel `[in, out]`."""
    if a.ndim == 4 and a.shape[2:] == (1, 1):
        a = a[:, :, 0, 0]
    return (a.T,)


def _linear_any(src, tgt):
    return [Rule(src + r"\.weight", (tgt + ".kernel",), _linear_or_1x1),
            Rule(src + r"\.bias", (tgt + ".bias",), C.same)]


def unet_table(cfg: UNetConfig) -> KeyTable:
    """The UNet's table; proj_in/proj_out are 1×1 convs (SD 1.x) or Linears (SD 2.x, `use_linear_projection`)."""
    proj = C.linear if cfg.use_linear_projection else C.conv
    return KeyTable((), (
        *C.conv(r"conv_in", "conv_in"),
        *C.linear(r"time_embedding\.(linear_[12])", r"time_embedding.\1"),
        *C.norm(_RES + r"\.(norm[12])", r"\1.resnets.\2.\3"),
        *C.conv(_RES + r"\.(conv[12]|conv_shortcut)", r"\1.resnets.\2.\3"),
        *C.linear(_RES + r"\.time_emb_proj", r"\1.resnets.\2.time_emb_proj"),
        *C.conv(r"(down_blocks\.\d+)\.downsamplers\.0\.conv", r"\1.downsamplers.0.conv"),
        *C.conv(r"(up_blocks\.\d+)\.upsamplers\.0\.conv", r"\1.upsamplers.0.conv"),
        *C.norm(_ATT + r"\.norm", r"\1.attentions.\2.norm"),
        *proj(_ATT + r"\.(proj_in|proj_out)", r"\1.attentions.\2.\3"),
        *C.norm(_TB + r"\.(norm[123])", _TB_T + r".\4"),
        *_linear_w(_TB + r"\.(attn[12])\.(to_[qkv])", _TB_T + r".\4.\5"),
        *C.linear(_TB + r"\.(attn[12])\.to_out\.0", _TB_T + r".\4.to_out.0"),
        *C.linear(_TB + r"\.ff\.net\.0\.proj", _TB_T + ".ff.net.0.proj"),
        *C.linear(_TB + r"\.ff\.net\.2", _TB_T + ".ff.net.2"),
        *C.norm(r"conv_norm_out", "conv_norm_out"),
        *C.conv(r"conv_out", "conv_out")), ())


_E = r"encoder\."
_ERES = _E + r"((?:down_blocks\.\d+|mid_block))\.resnets\.(\d+)"
_VATT = _E + r"mid_block\.attentions\.0"
_VATT_T = "encoder.mid_block.attentions.0"

VAE_TABLE = KeyTable((), (
    *C.conv(_E + "conv_in", "encoder.conv_in"),
    *C.norm(_ERES + r"\.(norm[12])", r"encoder.\1.resnets.\2.\3"),
    *C.conv(_ERES + r"\.(conv[12]|conv_shortcut)", r"encoder.\1.resnets.\2.\3"),
    *C.conv(_E + r"(down_blocks\.\d+)\.downsamplers\.0\.conv", r"encoder.\1.downsamplers.0.conv"),
    *C.norm(_VATT + r"\.group_norm", _VATT_T + ".group_norm"),
    *_linear_any(_VATT + r"\.(?:to_q|query)", _VATT_T + ".to_q"),
    *_linear_any(_VATT + r"\.(?:to_k|key)", _VATT_T + ".to_k"),
    *_linear_any(_VATT + r"\.(?:to_v|value)", _VATT_T + ".to_v"),
    *_linear_any(_VATT + r"\.(?:to_out\.0|proj_attn)", _VATT_T + ".to_out.0"),
    *C.norm(_E + "conv_norm_out", "encoder.conv_norm_out"),
    *C.conv(_E + "conv_out", "encoder.conv_out"),
    *C.conv(r"quant_conv", "quant_conv")), (
    (r"decoder\..*", "the decoder (latent → image) is not needed to encode images"),
    (r"post_quant_conv\..*", "post_quant_conv feeds the decoder")))

_L = r"encoder\.layers\.(\d+)"
TEXT_TABLE = KeyTable(("text_model.",), (
    *_embedding(r"embeddings\.token_embedding", "embeddings.token_embedding"),
    *_embedding(r"embeddings\.position_embedding", "embeddings.position_embedding"),
    *C.norm(_L + r"\.(layer_norm[12])", r"encoder.layers.\1.\2"),
    *C.linear(_L + r"\.self_attn\.([qkv]_proj|out_proj)", r"encoder.layers.\1.self_attn.\2"),
    *C.linear(_L + r"\.mlp\.(fc[12])", r"encoder.layers.\1.mlp.\2"),
    *C.norm(r"final_layer_norm", "final_layer_norm")), (
    (r"embeddings\.position_ids", "a buffer of 0..76, not a weight"),))


# ---------------------------------------------------------------------------------------------------------------
# Components: class, table, abstract state
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Component:
    name: str                     # "unet" | "vae" | "text_encoder" (also the subfolder)
    cls: type
    table: Callable[[Any], KeyTable]
    files: tuple[str, ...]        # preferred weight files in the subfolder


COMPONENTS = {
    "unet": Component("unet", UNet2DConditionModel, unet_table,
                      ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")),
    "vae": Component("vae", AutoencoderKL, lambda cfg: VAE_TABLE,
                     ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")),
    "text_encoder": Component("text_encoder", CLIPTextModel, lambda cfg: TEXT_TABLE,
                              ("model.safetensors", "model.fp16.safetensors")),
}


# ---------------------------------------------------------------------------------------------------------------
# config.json → our configs
# ---------------------------------------------------------------------------------------------------------------

# diffusers `UNet2DConditionModel.__init__` defaults of the fields read here.
_UNET_DEFAULTS = dict(in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                      block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
                      mid_block_scale_factor=1, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
                      transformer_layers_per_block=1, attention_head_dim=8, use_linear_projection=False,
                      upcast_attention=False)
# Options SD 1.x/2.x leave at these values; anything else is a different architecture, refused by name.
_UNET_FIXED = dict(center_input_sample=False, mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
                   act_fn="silu", encoder_hid_dim=None, encoder_hid_dim_type=None, num_attention_heads=None,
                   dual_cross_attention=False, class_embed_type=None, addition_embed_type=None, num_class_embeds=None,
                   resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
                   time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
                   timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
                   projection_class_embeddings_input_dim=None, attention_type="default",
                   class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
                   reverse_transformer_layers_per_block=None, addition_time_embed_dim=None)
_VAE_DEFAULTS = dict(in_channels=3, down_block_types=["DownEncoderBlock2D"], block_out_channels=[64],
                     layers_per_block=1, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
                     use_quant_conv=True, mid_block_add_attention=True)
_VAE_FIXED = dict(act_fn="silu", shift_factor=None)
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


# The fields each reader takes from config.json, and their kinds (`convert.check_fields`): a wrong type or a size
# < 1 is refused by name before any conversion.
_UNET_KINDS = dict(block_out_channels="pos_list", down_block_types="str_list", up_block_types="str_list",
                   layers_per_block="pos_or_list", transformer_layers_per_block="pos_or_list",
                   cross_attention_dim="pos_or_list", attention_head_dim="pos_or_list", in_channels="pos",
                   out_channels="pos", norm_num_groups="pos", norm_eps="pos_num", use_linear_projection="bool",
                   upcast_attention="bool", flip_sin_to_cos="bool", freq_shift="num", downsample_padding="nat",
                   mid_block_scale_factor="pos_num")
_VAE_KINDS = dict(down_block_types="str_list", block_out_channels="pos_list", layers_per_block="pos",
                  in_channels="pos", latent_channels="pos", norm_num_groups="pos", scaling_factor="pos_num",
                  use_quant_conv="bool", mid_block_add_attention="bool")
_TEXT_KINDS = dict(vocab_size="pos", hidden_size="pos", intermediate_size="pos", num_hidden_layers="pos",
                   num_attention_heads="pos", max_position_embeddings="pos", hidden_act="str", layer_norm_eps="pos_num")
_CONFIG_FIX = "fix or re-download the checkpoint's config.json"


def _check_groups(d: dict, what: str):
    bad = [c for c in d["block_out_channels"] if c % d["norm_num_groups"]]
    if bad:
        raise InputError(what, f"block_out_channels {bad} are not divisible into norm_num_groups="
                         f"{d['norm_num_groups']} groups", _CONFIG_FIX)


def _refuse_options(d: dict, fixed: dict, what: str):
    bad = [f"{k}={d[k]!r}" for k, v in fixed.items() if k in d and d[k] != v and not (v is None and d[k] in ([], {}))]
    if bad:
        raise InputError(what, f"uses options this port does not implement: {', '.join(bad)}",
                         "use a Stable Diffusion 1.x/2.x checkpoint")


def unet_config_from_diffusers(d: dict, what: str = "unet/config.json") -> UNetConfig:
    """Our `UNetConfig` for a diffusers `UNet2DConditionModel` config dict."""
    _refuse_options(d, _UNET_FIXED, what)
    d = {**_UNET_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    check_fields(d, _UNET_KINDS, what, _CONFIG_FIX)
    _check_groups(d, what)
    n = len(d["block_out_channels"])
    per = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        if isinstance(d[key], (list, tuple)):
            if len(set(d[key])) != 1:
                raise InputError(what, f"per-block {key}={d[key]} is not supported", "use an SD 1.x/2.x checkpoint")
            d[key] = d[key][0]
    try:
        return UNetConfig(block_out_channels=tuple(d["block_out_channels"]),
                          down_block_types=tuple(d["down_block_types"]), up_block_types=tuple(d["up_block_types"]),
                          layers_per_block=int(d["layers_per_block"]),
                          num_attention_heads=per(d["attention_head_dim"]),
                          cross_attention_dim=int(d["cross_attention_dim"]), in_channels=int(d["in_channels"]),
                          out_channels=int(d["out_channels"]), norm_num_groups=int(d["norm_num_groups"]),
                          norm_eps=float(d["norm_eps"]), use_linear_projection=bool(d["use_linear_projection"]),
                          upcast_attention=bool(d["upcast_attention"]),
                          transformer_layers_per_block=int(d["transformer_layers_per_block"]),
                          flip_sin_to_cos=bool(d["flip_sin_to_cos"]), freq_shift=float(d["freq_shift"]),
                          downsample_padding=int(d["downsample_padding"]),
                          mid_block_scale_factor=float(d["mid_block_scale_factor"]))
    except ValueError as e:
        raise InputError(what, str(e), "use a Stable Diffusion 1.x/2.x checkpoint") from None


def vae_config_from_diffusers(d: dict, what: str = "vae/config.json") -> VAEConfig:
    """Our `VAEConfig` for a diffusers `AutoencoderKL` config dict."""
    _refuse_options(d, _VAE_FIXED, what)
    d = {**_VAE_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    check_fields(d, _VAE_KINDS, what, _CONFIG_FIX)
    _check_groups(d, what)
    bad = [t for t in d["down_block_types"] if t != "DownEncoderBlock2D"]
    if bad or len(d["down_block_types"]) != len(d["block_out_channels"]):
        raise InputError(what, f"down_block_types {d['down_block_types']} not supported",
                         "use a Stable Diffusion 1.x/2.x VAE (DownEncoderBlock2D at every level)")
    return VAEConfig(block_out_channels=tuple(d["block_out_channels"]), layers_per_block=int(d["layers_per_block"]),
                     in_channels=int(d["in_channels"]), latent_channels=int(d["latent_channels"]),
                     norm_num_groups=int(d["norm_num_groups"]), scaling_factor=float(d["scaling_factor"]),
                     use_quant_conv=bool(d["use_quant_conv"]),
                     mid_block_add_attention=bool(d["mid_block_add_attention"]))


def text_config_from_hf(d: dict, what: str = "text_encoder/config.json") -> CLIPTextConfig:
    """Our `CLIPTextConfig` for a `transformers` CLIPTextConfig dict (or a CLIPConfig's `text_config`)."""
    check_fields(d, {"model_type": "str", "text_config": "obj"}, what, _CONFIG_FIX)
    if d.get("model_type") == "clip" and "text_config" in d:
        d, what = d["text_config"], f"{what} (text_config)"
        check_fields(d, {"model_type": "str"}, what, _CONFIG_FIX)
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise InputError(what, f"model_type {d.get('model_type')!r} is not a CLIP text model",
                         "use the text_encoder of a Stable Diffusion 1.x/2.x checkpoint")
    d = {**_TEXT_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    check_fields(d, _TEXT_KINDS, what, _CONFIG_FIX)
    try:
        return CLIPTextConfig(**{k: d[k] for k in _TEXT_DEFAULTS})
    except ValueError as e:
        raise InputError(what, str(e), "use the text_encoder of a Stable Diffusion 1.x/2.x checkpoint") from None


_FROM_JSON = {"unet": unet_config_from_diffusers, "vae": vae_config_from_diffusers,
              "text_encoder": text_config_from_hf}


# ---------------------------------------------------------------------------------------------------------------
# Loading one component from a directory
# ---------------------------------------------------------------------------------------------------------------

def _weight_files(path: str, comp: Component) -> list[str]:
    """The component's weight file(s) in `path`: the preferred names first (fp32 before fp16; never both, so
    variants do not silently overwrite each other), then a shard index, then a lone *.safetensors."""
    if os.path.isfile(path):
        return [path]
    for name in comp.files:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    for index in sorted(glob.glob(os.path.join(path, "*.safetensors.index.json"))):
        return shards_from_index(index)
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(found) == 1:
        return found
    if not found:
        raise InputError(path, f"holds no {comp.files[0]}",
                         f"put the {comp.name} weights (safetensors, diffusers layout) there")
    raise InputError(path, f"holds several weight files ({', '.join(os.path.basename(f) for f in found)}) and "
                     f"none is named {comp.files[0]}", "keep one, or rename the one to use")


def read_component(path: str, comp: Component) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(path, comp):
        tensors.update(read_safetensors(file))
    return tensors


def component_config(path: str, name: str, expected=None):
    """The component's config from `path`/config.json; with `expected`, refuse a different architecture."""
    file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if not os.path.isfile(file):
        if expected is None:
            raise InputError(path, "has no config.json", f"pass a diffusers-layout {name} folder (config.json + "
                             "safetensors)")
        return expected
    cfg = _FROM_JSON[name](read_json(file, _CONFIG_FIX), file)
    if expected is not None:
        theirs = dataclasses.replace(cfg, attn_chunk=expected.attn_chunk) if name == "unet" else cfg
        if theirs != expected:
            diff = [f"{f.name}={getattr(cfg, f.name)} (expected {getattr(expected, f.name)})"
                    for f in dataclasses.fields(cfg) if getattr(theirs, f.name) != getattr(expected, f.name)]
            raise InputError(file, f"describes a different model: {', '.join(diff)}",
                             "pass the checkpoint that matches --model, or the --model that matches the checkpoint")
        cfg = theirs
    return cfg


def load_component(name: str, path: str, expected=None, *, dtype=jnp.float32):
    """One component (`name` "unet" | "vae" | "text_encoder") from a diffusers-layout folder `path` (config.json
    + safetensors), converted through its key table. `expected`: the config it must have (else config.json's)."""
    comp = COMPONENTS[name]
    if not os.path.exists(path):
        raise InputError(path, "no such folder", f"pass the {name}/ folder of a diffusers-layout checkpoint")
    cfg = component_config(path, name, expected)
    fix = f"pass the {name} folder of a Stable Diffusion 1.x/2.x checkpoint in diffusers layout"
    tensors = read_component(path, comp)  # index and files checked before the model's shapes are traced
    params = apply_table(comp.table(cfg), abstract_model(comp.cls, cfg)[2], tensors, path, fix)
    return assemble(comp.cls, cfg, params, dtype)


def load_unet(path: str, expected: UNetConfig | None = None, *, dtype=jnp.float32) -> UNet2DConditionModel:
    return load_component("unet", path, expected, dtype=dtype)


def load_vae(path: str, expected: VAEConfig | None = None, *, dtype=jnp.float32) -> AutoencoderKL:
    return load_component("vae", path, expected, dtype=dtype)


def load_text_encoder(path: str, expected: CLIPTextConfig | None = None, *, dtype=jnp.float32) -> CLIPTextModel:
    return load_component("text_encoder", path, expected, dtype=dtype)


def random_component(name: str, cfg, seed: int = 0, *, dtype=jnp.float32):
    cls = COMPONENTS[name].cls
    return assemble(cls, cfg, random_params(cls, cfg, seed), dtype)
