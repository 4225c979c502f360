"""Checkpoints → `SiglipVision` parameters: Hugging Face safetensors (local directory or file, sharded with its
index, the HF hub cache, or a download when online) or a seeded random initialisation.

One explicit key table (`models.convert.apply_table`) for both variants, read from a vision-tower checkpoint
(`SiglipVisionModel`, `Siglip2VisionModel`) or a full one (`SiglipModel`, `Siglip2Model`: the `vision_model.`
prefix stripped, the text tower and the contrastive scalars listed as unused). The patch embedding is a Linear in
target layout `[p·p·3, C]` with inputs in (row, column, channel) order: NaFlex's Linear `[C, p·p·3]` is transposed,
FixRes's Conv2d `[C, 3, p, p]` reordered to `[p, p, 3, C]` and flattened — the same map. A FixRes model refuses a
NaFlex checkpoint and vice versa by that tensor (their shapes can agree: 3·16·16 = 768 for B/16). It fails, naming
the tensors, on a source key no row maps, a target parameter no source fills, a duplicate, and any shape mismatch.
bf16/fp16 tensors are read as stored (bf16 widened to float32 exactly) and cast once, to the `dtype` asked for.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.models import convert as C
from spectral_jax.models.convert import KeyTable, Rule, check_fields
from spectral_jax.models.siglip2.config import SiglipConfig
from spectral_jax.models.siglip2.modeling import SiglipVision


def _patch_kernel(a):
    """Conv2d `[C, 3, p, p]` → `[p·p·3, C]` ((row, column, channel) inputs); Linear `[C, p·p·3]` → its transpose."""
    return (a.transpose(2, 3, 1, 0).reshape(-1, a.shape[0]) if a.ndim == 4 else a.T,)


_L, _T = r"encoder\.layers\.(\d+)", r"encoder.layers.\1"

TABLE = KeyTable(("vision_model.",), (
    Rule(r"embeddings\.patch_embedding\.weight", ("embeddings.patch_embedding.kernel",), _patch_kernel),
    *C.param(r"embeddings\.patch_embedding\.bias", "embeddings.patch_embedding.bias"),
    *C.param(r"embeddings\.position_embedding\.weight", "embeddings.position_embedding"),
    *(r for n in ("q", "k", "v", "out") for r in C.linear(_L + rf"\.self_attn\.{n}_proj", _T + f".self_attn.{n}_proj")),
    *C.norm(_L + r"\.layer_norm1", _T + ".layer_norm1"),
    *C.norm(_L + r"\.layer_norm2", _T + ".layer_norm2"),
    *C.linear(_L + r"\.mlp\.fc1", _T + ".mlp.fc1"),
    *C.linear(_L + r"\.mlp\.fc2", _T + ".mlp.fc2"),
    *C.norm(r"post_layernorm", "post_layernorm")), (
    (r"head\..*", "the attention-pooling head only feeds the pooled output"),
    (r"embeddings\.position_ids", "a buffer of 0..N-1, not a weight"),
    (r"text_model\..*", "the SigLIP text tower"),
    (r"logit_(scale|bias)", "the contrastive temperature and bias")))


def convert(cfg: SiglipConfig, tensors: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Map a SigLIP (2) vision state dict onto `SiglipVision(cfg)`'s parameter paths ({dotted path: array});
    `what` names the checkpoint in error messages."""
    fix = f"pass a SigLIP 2 {'NaFlex' if cfg.variant == 'naflex' else 'FixRes'} checkpoint with this architecture"
    for key, arr in tensors.items():
        if key.removeprefix("vision_model.") == "embeddings.patch_embedding.weight":
            if np.ndim(arr) != (2 if cfg.variant == "naflex" else 4):
                kind = "a Linear (NaFlex)" if np.ndim(arr) == 2 else f"a {np.ndim(arr)}-D tensor"
                raise InputError(what, f"tensor {key} is {kind}, but the model is {cfg.variant}", fix)
    return C.apply_table(TABLE, C.abstract_model(SiglipVision, cfg)[2], tensors, what, fix, "SigLIP")


# The `transformers` vision-config defaults for the fields we read, and their kinds (`check_fields`).
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16, num_patches=256, hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6)
_HF_KINDS = dict(model_type="str", vision_config="obj", hidden_size="pos", intermediate_size="pos",
                 num_hidden_layers="pos", num_attention_heads="pos", image_size="pos", patch_size="pos",
                 num_patches="pos", hidden_act="str", layer_norm_eps="pos_num")
_TYPES = {"siglip": "fixed", "siglip_vision_model": "fixed", "siglip2": "naflex", "siglip2_vision_model": "naflex"}


def config_from_hf(hf: dict, what: str = "config.json") -> SiglipConfig:
    """Our `SiglipConfig` for a `transformers` SigLIP / SigLIP 2 config dict (vision tower, or the full model's
    `vision_config`); a field of the wrong type, another model_type or activation, or a NaFlex `num_patches` that
    is not a square is refused by name (`what`: the file)."""
    fix = "fix or re-download the checkpoint's config.json"
    if not isinstance(hf, dict):
        raise InputError(what, f"must hold a JSON object {{...}}, got a {type(hf).__name__}", fix)
    check_fields(hf, {"model_type": "str", "vision_config": "obj"}, what, fix)
    variant = _TYPES.get(hf.get("model_type"))
    if variant is None:
        raise InputError(what, f"model_type {hf.get('model_type')!r} is not a SigLIP model",
                         "use a SiglipModel/SiglipVisionModel (FixRes) or Siglip2Model/Siglip2VisionModel (NaFlex) "
                         "checkpoint")
    if hf["model_type"] in ("siglip", "siglip2"):
        hf, what = hf.get("vision_config", {}), f"{what} (vision_config)"
    hf = {**_HF_DEFAULTS, **hf}  # config.json files may omit fields left at their defaults
    check_fields(hf, _HF_KINDS, what, fix)
    if hf["hidden_act"] != "gelu_pytorch_tanh":
        raise InputError(what, f"hidden_act {hf['hidden_act']!r} is not supported", "use a gelu_pytorch_tanh model")
    grid = math.isqrt(hf["num_patches"]) if variant == "naflex" else hf["image_size"] // hf["patch_size"]
    if variant == "naflex" and grid * grid != hf["num_patches"]:
        raise InputError(what, f"num_patches {hf['num_patches']} is not a square", fix)
    try:
        return SiglipConfig(variant, hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                            hf["intermediate_size"], hf["patch_size"], grid, float(hf["layer_norm_eps"]))
    except ValueError as e:  # SiglipConfig's own checks (hidden_size a multiple of the heads, ...)
        raise InputError(what, str(e), fix) from None


def random_params(cfg: SiglipConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random initialisation in target layout (`convert.random_leaves`: weights and the position table
    N(0, 0.02²) clipped at ±2σ, biases 0, norm scales 1)."""
    return C.random_params(SiglipVision, cfg, seed)


def load_weights(cfg: SiglipConfig, source: str, *, dtype=jnp.float32, seed: int = 0) -> SiglipVision:
    """`SiglipVision(cfg)` with weights from `source`: a checkpoint directory or .safetensors file, an HF repo id,
    or "random" (seeded). A config.json beside the weights must describe `cfg` (its ε is taken)."""
    if source == "random":
        return C.assemble(SiglipVision, cfg, random_params(cfg, seed), dtype)
    path = C.resolve_checkpoint(source, "google/siglip2-base-patch16-naflex")
    file, hf = C.config_json(path)
    cfg = C.match_config(cfg, None if hf is None else config_from_hf(hf, file), path, ("layer_norm_eps",))
    return C.assemble(SiglipVision, cfg, convert(cfg, C.read_safetensors(path), path), dtype)
