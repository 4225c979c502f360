"""The SigLIP 2 family behind the backbone contract: `load_backbone(spec, weights) -> Backbone`
(`models.registry.load_backbone` dispatches here).

Shape legend
    B  images   (H, W) pixels (multiples of the patch size)   T  patch tokens (no prefix)   D  head dim
"""

from __future__ import annotations

import jax.numpy as jnp

from spectral_jax.models.backbone import Backbone, from_module
from spectral_jax.models.siglip2.params import load_weights
from spectral_jax.models.spec import ModelSpec


def load_backbone(spec: ModelSpec, weights: str | None = None, *, dtype=None, seed: int = 0) -> Backbone:
    """The SigLIP 2 vision tower of registry entry `spec` with its weights, as a `Backbone` whose taps are q/k/v
    `[B, H, T, D]`, prefix 0 (NaFlex: one batch, one grid, no padding).

    weights: a checkpoint directory or .safetensors file, an HF repo id (HF cache; downloaded only when online),
    None → `spec.repo_id`, or "random" (seeded from `seed`). dtype: parameters and compute (default float32).
    """
    source = spec.repo_id if weights is None else weights
    net = load_weights(spec.config, source, dtype=jnp.float32 if dtype is None else dtype, seed=seed)
    return from_module(spec, net, str(source))
