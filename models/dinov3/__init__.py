"""The DINOv3 ViT family (`transformers` `DINOv3ViTModel`): a Flax NNX `DINOv3ViT` with RoPE, registers and
layer scale, and its `load_backbone(spec, weights)`.

    config.py    DINOv3Config, the named PRESETS and the registry entries (MODELS) — no JAX
    modeling.py  the DINOv3ViT module (q/k/v taps of any layers, q and k after RoPE), rope_tables
    params.py    key table, config.json → DINOv3Config, load_weights
    backbone.py  load_backbone(spec, weights) -> Backbone

Names are imported on first use (PEP 562), so `spectral_jax.models.dinov3.config` does not import JAX.
"""

from spectral_jax import lazy as _lazy

_EXPORTS = {
    "DINOv3ViT": ".modeling", "rope_tables": ".modeling",
    "DINOv3Config": ".config", "PRESETS": ".config", "MODELS": ".config", "FAMILY": ".config",
    "load_weights": ".params", "config_from_hf": ".params",
    "load_backbone": ".backbone",
    "config": None, "modeling": None, "params": None, "backbone": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
