"""What the registry knows about a model without importing JAX: its preprocessing, its registry entry, and its
family's load options. Kept free of JAX so that `get_spec`, listing model names and the command line's early
checks are instant.

Shape legend
    H, W  image pixels   (H', W')  model-input pixels (multiples of `PreprocessSpec.patch_size`)
"""

from __future__ import annotations

import dataclasses
from typing import Any

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FORWARD_DTYPES = ("float32", "bfloat16")     # a backbone forward's dtypes (`load_backbone(dtype=)`, CLI --dtype)


def forward_dtype(name: str | None, what: str = "dtype"):
    """The `load_backbone(dtype=)` of a forward dtype name: None for "float32" or None (every family's float32
    default), jnp.bfloat16 for "bfloat16"; anything else is an `InputError` naming `what`."""
    if name in (None, "float32"):
        return None
    if name not in FORWARD_DTYPES:
        from spectral_jax.errors import InputError

        raise InputError(f"{what} {name!r}", "is not a forward dtype", f"choose one of {', '.join(FORWARD_DTYPES)}")
    import jax.numpy as jnp

    return jnp.bfloat16


# The resize filter each family's reference image processor uses (checked in transformers 5.24 / diffusers 0.42):
# DINOv2 `BitImageProcessor`, CLIP `CLIPImageProcessor`: bicubic. DINO v1 / MAE `ViTImageProcessor`, DINOv3
# `DINOv3ViTImageProcessor` (torchvision only, antialiased), SigLIP 2 `Siglip2ImageProcessor` and the FixRes SigLIP 2
# checkpoints (big_vision's bilinear `resize`): bilinear. Stable Diffusion and the DiTs (`VaeImageProcessor`):
# Lanczos. Names: `spectral_jax.io.RESAMPLE_FILTERS`.
BICUBIC, BILINEAR, LANCZOS = "bicubic", "bilinear", "lanczos"


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How to turn an image into the model's input: shorter side → `size` (multiple of `patch_size`) by PIL's
    `resample` filter ("bicubic" | "bilinear" | "lanczos": the family's reference processor's), then
    `(x/255 - mean) / std` per RGB channel (`spectral_jax.io.preprocess`). An unknown filter → `InputError`."""

    size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = BICUBIC

    def __post_init__(self):
        import math

        from spectral_jax import io
        from spectral_jax.errors import InputError, is_integer

        for what in ("size", "patch_size"):
            v = getattr(self, what)
            if not is_integer(v) or v < 1:
                raise InputError(f"{what} {v!r}", "must be an integer >= 1", f"pass e.g. {what}=14")
        for what in ("mean", "std"):
            v = getattr(self, what)
            try:
                ok = len(v) == 3 and all(math.isfinite(float(c)) for c in v)
            except (TypeError, ValueError):
                ok = False
            if not ok or (what == "std" and min(float(c) for c in v) <= 0):
                raise InputError(f"{what} {v!r}", "must be 3 finite numbers, one per RGB channel"
                                 + (", each > 0" if what == "std" else ""), f"pass e.g. {what}=(0.5, 0.5, 0.5)")
        io.check_resample(self.resample, "PreprocessSpec.resample")

    def image(self, image, size=None, name: str | None = None):
        """uint8 `[H, W, 3]` → the model's float32 input `[H', W', 3]`; size: S, (H, W), "S" or "HxW"
        (`io.parse_size`), None → `self.size`; name: what `io.preprocess`'s warning calls the image."""
        import numpy as np

        from spectral_jax import io

        return io.preprocess(np.asarray(image), self.size if size is None else io.parse_size(size),
                             self.patch_size, self.mean, self.std, self.resample, name=name)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registry entry: `name`, its `family` (the folder under `models/` that loads it: "vit" | "sd" | "dit" |
    "dinov3" | "siglip2"), the architecture `config` (a frozen dataclass of that family), the Hugging Face `repo_id`
    of its published weights (None: none published) and its preprocessing."""

    name: str
    config: Any
    repo_id: str | None
    preprocess: PreprocessSpec
    family: str


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family as the registry sees it: `name` (its package, `spectral_jax.models.<name>`, which exposes
    `load_backbone(spec, weights, **options)`), `title` (for messages), the keyword `options` its `load_backbone`
    takes, and whether its taps can carry hidden states."""

    name: str
    title: str
    options: tuple[str, ...]
    hidden: bool


__all__ = ["BICUBIC", "BILINEAR", "Family", "IMAGENET_MEAN", "IMAGENET_STD", "LANCZOS", "ModelSpec", "PreprocessSpec"]
