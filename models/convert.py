"""Checkpoint → Flax state, shared by every family: explicit key tables, their application with coverage checked
in both directions, filling an abstract state (`nnx.eval_shape`, nothing initialised twice), seeded random
parameters, and reading checkpoint files (safetensors, sharded or not; config.json type-checked).

A `KeyTable` row (`Rule`) maps a source-key regex to target parameter path(s) of the Flax module plus a transform
(Linear `[out, in]` → kernel `[in, out]`; Conv `[O, I, kh, kw]` → `[kh, kw, I, O]`; norm weight → scale).
`apply_table` fails, naming the tensors, on a source key no rule maps, on a target parameter no source fills, on a
duplicate, and on any shape mismatch; deliberately unused source keys are listed in the table with the reason.

Shape legend
    O, I  output / input channels (features)   kh, kw  kernel size
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import glob
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


@dataclasses.dataclass(frozen=True)
class KeyTable:
    prefixes: tuple[str, ...]  # optional source-key prefixes (task-model wrappers), stripped before matching
    rules: tuple[Rule, ...]
    ignored: tuple[tuple[str, str], ...]  # (source-key regex, why it is not loaded)


def same(a):
    return (a,)


def linear_t(a):  # torch Linear weight [O, I] → Flax kernel [I, O]
    return (a.T,)


def conv_t(a):  # torch Conv2d weight [O, I, kh, kw] → Flax kernel [kh, kw, I, O]
    return (a.transpose(2, 3, 1, 0),)


def param(src, tgt, transform=same) -> list[Rule]:
    """One tensor → one parameter."""
    return [Rule(src, (tgt,), transform)]


def linear(src, tgt) -> list[Rule]:
    """torch Linear (weight, bias) → nnx.Linear (kernel, bias)."""
    return [Rule(src + r"\.weight", (tgt + ".kernel",), linear_t), Rule(src + r"\.bias", (tgt + ".bias",), same)]


def norm(src, tgt) -> list[Rule]:
    """torch LayerNorm/GroupNorm (weight, bias) → nnx (scale, bias)."""
    return [Rule(src + r"\.weight", (tgt + ".scale",), same), Rule(src + r"\.bias", (tgt + ".bias",), same)]


def conv(src, tgt) -> list[Rule]:
    """torch Conv2d (weight, bias) → nnx.Conv (kernel, bias)."""
    return [Rule(src + r"\.weight", (tgt + ".kernel",), conv_t), Rule(src + r"\.bias", (tgt + ".bias",), same)]


def short(names, n=6) -> str:
    """The first `n` names, comma-separated, and how many more."""
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
        raise InputError(what, f"{len(unmapped)} tensor(s) not in the {table_name}: {short(unmapped)}", fix)
    missing = [p for p in targets if p not in out]
    if missing:
        raise InputError(what, f"no tensor for {len(missing)} parameter(s): {short(missing)}", fix)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Abstract state, filling it, random parameters
# ---------------------------------------------------------------------------------------------------------------

def flatten(tree, prefix=()):
    """Nested dict → {dotted path: (key tuple, leaf)}, keeping the original key tuples for the way back."""
    out = {}
    for k, v in tree.items():
        path = (*prefix, k)
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[".".join(str(p) for p in path)] = (path, v)
    return out


@contextlib.contextmanager
def _cheap_tracer_attribute_errors():
    """While tracing a constructor, flax's `Variable.__setitem__` probes `getattr(tracer, "sharding", None)` at every
    RNG draw, and jax builds that AttributeError's message (which `getattr` then discards) by walking the whole
    jaxpr traced so far (`find_progenitors`): quadratic in the parameters. This skips the message (the speed-up:
    benchmarks/results/history.md). Where jax's private hook is not where this expects it, nothing changes (only the
    speed-up is lost)."""
    try:
        from jax._src.interpreters import partial_eval as pe

        cls = pe.DynamicJaxprTracer
        old = cls.__dict__["_origin_msg"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    cls._origin_msg = lambda self: ""
    try:
        yield
    finally:
        cls._origin_msg = old


@functools.lru_cache(maxsize=16)
def _abstract(cls, cfg, dtype):
    with _cheap_tracer_attribute_errors():
        graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    return graphdef, state, {p: leaf for p, (_, leaf) in flatten(nnx.to_pure_dict(state)).items()}


def abstract_model(cls, cfg, dtype=jnp.float32):
    """(graphdef, abstract state, {dotted path: ShapeDtypeStruct}) of `cls(cfg, dtype=dtype)`, nothing allocated.

    Tracing a constructor takes a second or two, so it is cached per (cls, cfg, dtype); the state returned is a
    fresh copy.
    """
    graphdef, state, flat = _abstract(cls, cfg, jnp.dtype(dtype))
    return graphdef, jax.tree.map(lambda x: x, state), flat


def fill_state(graphdef, state, params: dict[str, np.ndarray], dtype=jnp.float32):
    """The module `graphdef` with every leaf of the abstract `state` taken from `params` ({dotted path: array})."""
    pure = nnx.to_pure_dict(state)
    for path, (keys, _) in flatten(pure).items():
        node = pure
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = jnp.asarray(params[path], dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def assemble(cls, cfg, params: dict[str, np.ndarray], dtype=jnp.float32):
    """`cls(cfg, dtype=dtype)` with its abstract state filled from `params` ({dotted path: array})."""
    graphdef, state, _ = abstract_model(cls, cfg, dtype)
    return fill_state(graphdef, state, params, dtype)


_ABSTRACT_WEIGHTS = contextvars.ContextVar("spectral_jax_abstract_weights", default=False)


@contextlib.contextmanager
def abstract_weights():
    """Within it (this thread / context only), `random_leaves` draws nothing: it gives `jnp.zeros` of each leaf's
    shape, which under `jax.eval_shape` are traced shapes — so a family's random-weight loader, run under
    `eval_shape` inside this context, builds its model's params as `ShapeDtypeStruct`s without drawing or allocating a
    weight (`dataset.memory.abstract_backbone`). It does not make a loader abstract outside `eval_shape` (there the
    zeros are real arrays) and does not touch checkpoint reads."""
    token = _ABSTRACT_WEIGHTS.set(True)
    try:
        yield
    finally:
        _ABSTRACT_WEIGHTS.reset(token)


def random_leaves(abstract: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """{dotted path: ShapeDtypeStruct} → seeded arrays: `scale`/`lambda1` leaves 1, `bias` 0, the rest
    N(0, 0.02²) clipped at ±2σ, drawn in path order from `seed` (the references' init scheme for linears). Inside
    `abstract_weights()`: zeros of each leaf's shape and dtype, nothing drawn."""
    if _ABSTRACT_WEIGHTS.get():
        return {path: jnp.zeros(leaf.shape, leaf.dtype) for path, leaf in abstract.items()}
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


def random_params(cls, cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random initialisation of `cls(cfg)` in target layout (`random_leaves`)."""
    return random_leaves(abstract_model(cls, cfg)[2], seed)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files: config.json / index.json read and type-checked (every problem one `InputError` naming the
# file), safetensors read with numpy
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
        raise InputError(index, f"names {len(missing)} missing shard file(s): {short(missing, 3)}", fix)
    return [os.path.join(folder, n) for n in names]


SINGLE_FILE = "model.safetensors"   # transformers' name for an unsharded checkpoint


def safetensors_files(path: str) -> list[str]:
    """The weight files of checkpoint `path`: a .safetensors file itself; in a directory, the shards its
    model.safetensors.index.json names, else its model.safetensors, else its one *.safetensors ([] if none).
    Several *.safetensors with neither (a fp16 copy beside the weights, shards without their index, unrelated
    files) → `InputError` naming them: loading them all would let one file's tensors overwrite another's."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, SINGLE_FILE + ".index.json")
    if os.path.isfile(index):
        return shards_from_index(index)
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return [os.path.join(path, SINGLE_FILE)]
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if len(found) > 1:
        names = [os.path.basename(f) for f in found]
        raise InputError(path, f"holds {len(found)} .safetensors files ({short(names, 4)}) and no {SINGLE_FILE} or "
                         f"{SINGLE_FILE}.index.json to say which are the weights",
                         f"pass the file to load (e.g. --weights {found[0]}), or add the index of a sharded "
                         f"checkpoint, or keep only the checkpoint's files in the folder")
    return found


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (sharded or not) or a single .safetensors file, as numpy arrays."""
    from safetensors import SafetensorError, safe_open

    files = safetensors_files(path)
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


# ---------------------------------------------------------------------------------------------------------------
# A family's checkpoint: where it is, its config.json, the architecture it declares (shared by dinov3/, siglip2/)
# ---------------------------------------------------------------------------------------------------------------

def resolve_checkpoint(source: str, example: str) -> str:
    """A local path for `source` (directory, .safetensors file, or an HF repo id found in the cache or downloaded
    when online — `models.hub`); `example` is a repo id the error messages suggest."""
    from spectral_jax.models import hub

    how = (f"fetch it once while online: `hf download {source}` fills the HF cache; or put its config.json and "
           f"*.safetensors in a directory and pass `--weights DIR`")
    return hub.resolve(source, local=os.path.exists, local_words="file or directory",
                       fix=f"pass a checkpoint directory, a repo id like {example}, or 'random'",
                       patterns=["*.safetensors", "*.json"], holds=hub.has_safetensors, how_to_get=how,
                       lacking=("the repository has no .safetensors files", "choose a repository that has them"))


def config_json(path: str) -> tuple[str, dict | None]:
    """(file, its JSON object or None when absent): the config.json beside checkpoint `path` (directory or file)."""
    file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    return file, (read_json(file, "fix or re-download the checkpoint's config.json") if os.path.isfile(file)
                  else None)


def match_config(cfg, theirs, what: str, soft: tuple[str, ...] = ()):
    """The architecture to build: `theirs` (from the checkpoint's config.json; None → `cfg`) when it equals `cfg`
    in every field but the `soft` ones (numerical settings such as a norm's ε, taken from the checkpoint); a
    difference elsewhere → `InputError` naming each field."""
    if theirs is None:
        return cfg
    diff = [f"{f.name}={getattr(theirs, f.name)} (expected {getattr(cfg, f.name)})" for f in dataclasses.fields(cfg)
            if f.name not in soft and getattr(theirs, f.name) != getattr(cfg, f.name)]
    if diff:
        raise InputError(what, f"config.json describes a different model: {', '.join(diff)}",
                         "pass the checkpoint that matches --model, or the --model that matches the checkpoint")
    return theirs
