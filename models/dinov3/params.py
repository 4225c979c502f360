"""Checkpoints → `DINOv3ViT` parameters: Hugging Face safetensors (local directory or file, sharded with its index,
the HF hub cache, or a download when online) or a seeded random initialisation.

Conversion goes through one explicit key table (`models.convert.apply_table`): a row maps a source-key regex to a
`DINOv3ViT` parameter path plus a transform (Linear `[out, in]` → kernel `[in, out]`; Conv `[C, 3, p, p]` →
`[p, p, 3, C]`). Both layouts of `transformers` are read: `layer.i.*` (the released checkpoints, transformers
4.56) and `model.layer.i.*` (transformers 5). It fails, naming the tensors, on a source key no row maps, a target
parameter no source fills, a duplicate, and any shape mismatch. bf16/fp16 tensors are read as stored (bf16 widened
to float32 exactly, numpy having no bfloat16) and cast once, to the `dtype` asked for.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.models import convert as C
from spectral_jax.models.convert import KeyTable, check_fields
from spectral_jax.models.dinov3.config import DINOv3Config
from spectral_jax.models.dinov3.modeling import DINOv3ViT

_L, _T = r"(?:model\.)?layer\.(\d+)", r"layer.\1"

TABLE = KeyTable(("dinov3_vit.", "backbone."), (
    *C.param(r"embeddings\.cls_token", "embeddings.cls_token"),
    *C.param(r"embeddings\.register_tokens", "embeddings.register_tokens"),
    *C.conv(r"embeddings\.patch_embeddings", "embeddings.patch_embeddings"),
    *(r for n in "qkvo" for r in C.linear(_L + rf"\.attention\.{n}_proj", _T + f".attention.{n}_proj")),
    *C.norm(_L + r"\.norm1", _T + ".norm1"),
    *C.norm(_L + r"\.norm2", _T + ".norm2"),
    *C.param(_L + r"\.layer_scale1\.lambda1", _T + ".layer_scale1.lambda1"),
    *C.param(_L + r"\.layer_scale2\.lambda1", _T + ".layer_scale2.lambda1"),
    *(r for n in ("gate", "up", "down") for r in C.linear(_L + rf"\.mlp\.{n}_proj", _T + f".mlp.{n}_proj")),
    *C.norm(r"norm", "norm")), (
    (r"embeddings\.mask_token", "the mask token is only used in masked-image pretraining"),))


def convert(cfg: DINOv3Config, tensors: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Map a `DINOv3ViTModel` state dict onto `DINOv3ViT(cfg)`'s parameter paths ({dotted path: array});
    `what` names the checkpoint in error messages."""
    fix = "pass a DINOv3 ViT checkpoint with this architecture"
    return C.apply_table(TABLE, C.abstract_model(DINOv3ViT, cfg)[2], tensors, what, fix, "DINOv3")


# The `transformers` DINOv3ViTConfig defaults for the fields we read, and their kinds (`check_fields`).
_HF_DEFAULTS = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                    hidden_act="gelu", layer_norm_eps=1e-5, rope_theta=100.0, patch_size=16, num_register_tokens=0,
                    use_gated_mlp=False, query_bias=True, key_bias=False, value_bias=True, proj_bias=True,
                    mlp_bias=True)
_HF_KINDS = dict(model_type="str", hidden_size="pos", intermediate_size="pos", num_hidden_layers="pos",
                 num_attention_heads="pos", hidden_act="str", layer_norm_eps="pos_num", rope_theta="pos_num",
                 patch_size="pos_or_list", num_register_tokens="nat", use_gated_mlp="bool", query_bias="bool",
                 key_bias="bool", value_bias="bool", proj_bias="bool", mlp_bias="bool")


def config_from_hf(hf: dict, what: str = "config.json") -> DINOv3Config:
    """Our `DINOv3Config` for a `transformers` `DINOv3ViTConfig` dict; a field of the wrong type, another
    model_type, a non-square patch or an unsupported activation is refused by name (`what`: the file)."""
    fix = "fix or re-download the checkpoint's config.json"
    if not isinstance(hf, dict):
        raise InputError(what, f"must hold a JSON object {{...}}, got a {type(hf).__name__}", fix)
    check_fields(hf, _HF_KINDS, what, fix)
    if hf.get("model_type") != "dinov3_vit":
        raise InputError(what, f"model_type {hf.get('model_type')!r} is not a DINOv3 ViT",
                         "use a DINOv3ViTModel checkpoint (model_type dinov3_vit)")
    hf = {**_HF_DEFAULTS, **hf}  # config.json files may omit fields left at their defaults
    p = hf["patch_size"]
    if isinstance(p, list) and len(set(p)) != 1:
        raise InputError(what, f"patch_size {p} is not square", "use a checkpoint with square patches")
    if hf["hidden_act"] not in ("gelu", "silu"):
        raise InputError(what, f"hidden_act {hf['hidden_act']!r} is not supported", "use a gelu or silu model")
    try:
        return DINOv3Config(hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                            hf["intermediate_size"], p[0] if isinstance(p, list) else p, hf["num_register_tokens"],
                            float(hf["layer_norm_eps"]), float(hf["rope_theta"]), hf["hidden_act"],
                            hf["use_gated_mlp"], hf["query_bias"], hf["key_bias"], hf["value_bias"], hf["proj_bias"],
                            hf["mlp_bias"])
    except ValueError as e:  # DINOv3Config's own checks (hidden_size a multiple of the heads, ...)
        raise InputError(what, str(e), fix) from None


def random_params(cfg: DINOv3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random initialisation in target layout (`convert.random_leaves`: weights and tokens N(0, 0.02²)
    clipped at ±2σ, biases 0, norm and layer scales 1)."""
    return C.random_params(DINOv3ViT, cfg, seed)


def load_weights(cfg: DINOv3Config, source: str, *, dtype=jnp.float32, seed: int = 0) -> DINOv3ViT:
    """`DINOv3ViT(cfg)` with weights from `source`: a checkpoint directory or .safetensors file, an HF repo id, or
    "random" (seeded). A config.json beside the weights must describe `cfg` (its ε and RoPE θ are taken)."""
    if source == "random":
        return C.assemble(DINOv3ViT, cfg, random_params(cfg, seed), dtype)
    path = C.resolve_checkpoint(source, "facebook/dinov3-vits16-pretrain-lvd1689m")
    file, hf = C.config_json(path)
    cfg = C.match_config(cfg, None if hf is None else config_from_hf(hf, file), path, ("layer_norm_eps", "rope_theta"))
    return C.assemble(DINOv3ViT, cfg, convert(cfg, C.read_safetensors(path), path), dtype)
